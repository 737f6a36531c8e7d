"""The KServe v2 / Triton inference protocol over REST: tensors in JSON, or as raw bytes after
the JSON (the binary tensor data extension), as `tritonclient.http` sends and reads them.

A request body is JSON, or JSON followed by the tensors' bytes, the JSON's length then given in
the header `Inference-Header-Content-Length`; an input sent as bytes says its byte count in
`parameters.binary_data_size`. An output is returned as bytes when the request asks for it
(`outputs[i].parameters.binary_data`, or `parameters.binary_data_output` for all), else as a
flat JSON list."""

import json

import numpy as np

from ..runtime.dtypes import np_dtype

__all__ = ["RequestError", "DATATYPES", "datatype", "tensor_metadata", "parse_infer", "encode_infer"]

# KServe v2 datatype -> numpy dtype name
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}
_BY_NUMPY = {v: k for k, v in DATATYPES.items()}


class RequestError(Exception):
    """A request the server cannot take: 400, naming the field. status: the HTTP status."""

    def __init__(self, message, field=None, status=400):
        self.field, self.status = field, status
        super().__init__(f"{field}: {message}" if field else message)


def datatype(np_name: str) -> str:
    """The KServe v2 datatype of a numpy dtype name ('float32' -> 'FP32')."""
    return _BY_NUMPY[np_name]


def tensor_metadata(spec: dict) -> dict:
    """A bundle signature entry as v2 tensor metadata (a dynamic dimension is -1)."""
    dynamic = {d["dim"] for d in spec.get("dynamic", ())}
    return {"name": spec["name"], "datatype": datatype(spec["dtype"]),
            "shape": [-1 if k in dynamic else int(n) for k, n in enumerate(spec["shape"])]}


def _header(body: bytes, header_length):
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(f"{header_length!r} is not a byte count", "Inference-Header-Content-Length") from None
    if not 0 < n <= len(body):
        raise RequestError(f"{n} is outside the body of {len(body)} bytes", "Inference-Header-Content-Length")
    return body[:n], body[n:]


def _check_type(value, kind, field):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"expected {getattr(kind, '__name__', 'a value of another type')}, got {type(value).__name__}",
                           field)
    return value


def parse_infer(body: bytes, header_length, inputs: list) -> tuple:
    """A v2 infer request -> (request id or None, [np.ndarray per bundle input, in its order],
    {output name: binary?} for the outputs asked (None: all), binary_data_output default).
    inputs: the bundle's input signature entries. RequestError names the field at fault."""
    head, tail = _header(body, header_length)
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not JSON ({e})", "body") from None
    _check_type(req, dict, "body")
    rid = req.get("id")
    if rid is not None:
        _check_type(rid, str, "id")
    params = _check_type(req.get("parameters") or {}, dict, "parameters")
    binary_default = bool(params.get("binary_data_output", False))
    given = _check_type(req.get("inputs"), list, "inputs") if "inputs" in req else None
    if given is None:
        raise RequestError("missing", "inputs")
    by_name, offset = {}, 0
    names = [s["name"] for s in inputs]
    for i, t in enumerate(given):
        f = f"inputs[{i}]"
        _check_type(t, dict, f)
        name = _check_type(t.get("name"), str, f + ".name")
        if name not in names:
            raise RequestError(f"the model has no input {name!r} (its inputs: {', '.join(names)})", f + ".name")
        if name in by_name:
            raise RequestError(f"input {name!r} given twice", f + ".name")
        spec = inputs[names.index(name)]
        shape = _check_type(t.get("shape"), list, f + ".shape")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise RequestError(f"{shape} is not a list of sizes", f + ".shape")
        dt = _check_type(t.get("datatype"), str, f + ".datatype")
        if dt not in DATATYPES:
            raise RequestError(f"{dt!r} is not a datatype this server takes ({', '.join(DATATYPES)})", f + ".datatype")
        want = datatype(spec["dtype"])
        if dt != want:
            raise RequestError(f"input {name!r} is {want}, not {dt}", f + ".datatype")
        dtype = np_dtype(DATATYPES[dt])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        tparams = _check_type(t.get("parameters") or {}, dict, f + ".parameters")
        if "binary_data_size" in tparams:
            size = _check_type(tparams["binary_data_size"], int, f + ".parameters.binary_data_size")
            if size != count * dtype.itemsize:
                raise RequestError(f"{size} bytes for {count} {dt} values of {dtype.itemsize} bytes",
                                   f + ".parameters.binary_data_size")
            if offset + size > len(tail):
                raise RequestError(f"the body holds {len(tail) - offset} bytes after the JSON for {size}",
                                   f + ".parameters.binary_data_size")
            a = np.frombuffer(tail, dtype, count, offset).reshape(shape).copy()
            offset += size
        else:
            if "data" not in t:
                raise RequestError("no data (give data, or binary_data_size and the bytes after the JSON)", f + ".data")
            if dt == "BF16":
                raise RequestError("BF16 values must be sent as binary data", f + ".data")
            try:
                a = np.asarray(t["data"], dtype=DATATYPES[dt] if dt != "BOOL" else None)
            except (TypeError, ValueError, OverflowError) as e:
                raise RequestError(f"not {dt} values ({e})", f + ".data") from None
            if dt == "BOOL":
                if a.size and a.dtype != np.bool_:
                    raise RequestError("BOOL values must be true or false", f + ".data")
                a = a.astype(np.bool_)
            if a.size != count:
                raise RequestError(f"{a.size} values for shape {shape} ({count})", f + ".data")
            a = np.ascontiguousarray(a.reshape(shape))
        by_name[name] = a
    if offset != len(tail):
        raise RequestError(f"{len(tail) - offset} bytes after the JSON that no input claims", "body")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RequestError(f"input {missing[0]!r} is not given (the model's inputs: {', '.join(names)})", "inputs")
    asked = None
    if "outputs" in req:
        asked = {}
        for i, o in enumerate(_check_type(req["outputs"], list, "outputs")):
            _check_type(o, dict, f"outputs[{i}]")
            name = _check_type(o.get("name"), str, f"outputs[{i}].name")
            op = _check_type(o.get("parameters") or {}, dict, f"outputs[{i}].parameters")
            if "classification" in op:
                raise RequestError("the classification extension is not supported", f"outputs[{i}].parameters")
            asked[name] = bool(op.get("binary_data", binary_default))
    return rid, [by_name[n] for n in names], asked, binary_default


def encode_infer(model: str, version: str, rid, outputs: list, arrays: list, asked, binary_default) -> tuple:
    """A v2 infer response -> (body bytes, headers). outputs: the bundle's output signature
    entries; asked: as parse_infer gives it (unknown names are a RequestError)."""
    names = [s["name"] for s in outputs]
    if asked is not None:
        unknown = [n for n in asked if n not in names]
        if unknown:
            raise RequestError(f"the model has no output {unknown[0]!r} (its outputs: {', '.join(names)})", "outputs")
    out, blobs = [], []
    for spec, a in zip(outputs, arrays):
        if asked is not None and spec["name"] not in asked:
            continue
        a = np.ascontiguousarray(a)
        entry = {"name": spec["name"], "datatype": datatype(str(a.dtype)), "shape": list(a.shape)}
        binary = asked[spec["name"]] if asked is not None else binary_default
        if binary or entry["datatype"] == "BF16":
            raw = a.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = a.reshape(-1).tolist()
        out.append(entry)
    resp = {"model_name": model, "model_version": version, "outputs": out}
    if rid is not None:
        resp["id"] = rid
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head))}
