"""compiler/kernels.py: the hand-written few-rows matmul (rowdot) against numpy, as written for
AVX-512 (32 registers of 16 lanes) and for AVX2 (16 of 8; it runs on either host), and its
use in a decode bundle (passes/rowdot.py rewrites the matmul; test/passes/rowdot.mlir)."""

import json
import zipfile

import numpy as np
import pytest

# (rows, n, k, dtype): decode at batch 1, verify's 5 rows, a batch of 8, n not a multiple of
# the rows read together or of a workgroup, 16-bit weights.
CASES = [(1, 2048, 768, "f32"), (5, 256, 768, "f32"), (8, 1000, 64, "f32"), (3, 50, 32, "f16"), (1, 300, 128, "f16"),
         (2, 64, 96, "bf16"), (1, 200, 64, "bf16"), (7, 52, 64, "f16"), (8, 36, 64, "bf16")]


def _rowdot_module(cases, regs):
    """Each (m, n, k, dtype) of `cases` (m may be DYNAMIC; n a tuple for a group of weights) as
    rowdot's executable behind a function f<i>(x, w...) -> y..., compiled for this host: -> the
    module's functions."""
    from polyarch.compiler.kernels import name, rowdot_source
    from polyarch.passes.rowdot import DYNAMIC

    src, calls = [], []
    for i, (m, n, k, dt) in enumerate(cases):
        src.append(rowdot_source(m, n, k, dt, regs))
        rows, ns = "?" if m == DYNAMIC else m, n if isinstance(n, tuple) else (n,)
        tx, tws, tys = f"tensor<{rows}x{k}x{dt}>", [f"tensor<{v}x{k}x{dt}>" for v in ns], [f"tensor<{rows}x{v}x{dt}>" for v in ns]
        ws, ys = ", ".join(f"%w{j}" for j in range(len(ns))), ", ".join(f"%y#{j}" for j in range(len(ns)))
        calls.append(f"func.func @f{i}(%x: {tx}, {', '.join(f'%w{j}: {t}' for j, t in enumerate(tws))}) -> ({', '.join(tys)}) {{\n"
                     f"  %y:{len(ns)} = func.call @{name(m, n, k, dt)}(%x, {ws}) : ({tx}, {', '.join(tws)}) -> ({', '.join(tys)})\n"
                     f"  return {ys} : {', '.join(tys)}\n}}")
    return _compiled("\n".join(src + calls))


def _compiled(text):
    """MLIR text compiled for this host's cpu and loaded: -> the module's functions."""
    import iree.compiler as ic
    import iree.runtime as rt

    vmfb = ic.compile_str(text, extra_args=[
        "--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
        "--iree-llvmcpu-target-cpu=host"])
    cfg = rt.Config("local-task")
    ctx = rt.SystemContext(config=cfg)
    ctx.add_vm_module(rt.VmModule.copy_buffer(cfg.vm_instance, vmfb))
    return ctx.modules.module


TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}  # of float64 numpy, relative to the result's largest magnitude


def _np_dtype(dt):
    import ml_dtypes

    return {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}[dt]


def _assert_close(y, ref, dt, *case):
    """y (a kernel's result) of ref's shape, of dtype dt, within TOLERANCE[dt] of ref (float64)."""
    assert y.shape == ref.shape and y.dtype == _np_dtype(dt)
    err = np.abs(y.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= TOLERANCE[dt], (*case, err)


def _two_operand_module(kernels):
    """Each (executable source, callee, x type, w type, y type) of `kernels` behind a function
    f<i>(x, w) -> y that calls it, compiled for this host: -> the module's functions."""
    src, calls = [], []
    for i, (text, callee, tx, tw, ty) in enumerate(kernels):
        src.append(text)
        calls.append(f"func.func @f{i}(%x: {tx}, %w: {tw}) -> {ty} {{\n  %y = func.call @{callee}"
                     f"(%x, %w) : ({tx}, {tw}) -> {ty}\n  return %y : {ty}\n}}")
    return _compiled("\n".join(src + calls))


@pytest.mark.parametrize("regs", [(32, 16), (16, 8)], ids=["avx512", "avx2"])
def test_rowdot_equals_numpy(regs):
    """Each shape within 1e-5 (f32) / 2e-3 (f16) / 1e-2 (bf16) of float64 numpy on the same
    inputs, relative to the result's largest magnitude (16-bit inputs accumulate in f32, the
    result is rounded to 16 bits). bf16 with k a multiple of 32 uses vdpbf16ps where the host
    has AVX512-BF16 (the AVX2 layout never does): both paths are checked on such a host."""
    module = _rowdot_module(CASES, regs)
    rng = np.random.default_rng(0)
    for i, (m, n, k, dt) in enumerate(CASES):
        npdt = _np_dtype(dt)
        x = rng.standard_normal((m, k)).astype(npdt)
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(npdt)
        y = module[f"f{i}"](x, w).to_host()
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        assert ref.shape == (m, n)
        _assert_close(y, ref, dt, CASES[i])


# groups of weights multiplied by one x in one dispatch: a layer's q, k, v (f16) and gate, up
# (f32) at batch 1, verify's 5 rows, bf16 with vdpbf16ps where the host has it (k % 32 == 0),
# weights whose rows are not a multiple of a workgroup's
GROUP_CASES = [(1, (768, 256, 256), 768, "f16"), (1, (512, 512), 64, "f32"), (5, (300, 128), 64, "f32"),
               (2, (64, 96, 200), 96, "bf16"), (3, (50, 32, 7, 130), 32, "f16")]


@pytest.mark.parametrize("regs", [(32, 16), (16, 8)], ids=["avx512", "avx2"])
def test_rowdot_group_equals_numpy(regs):
    """Each weight's result of a group within the single kernel's tolerance of float64 numpy
    (relative to its largest magnitude): each workgroup serves the weight whose range holds it."""
    module = _rowdot_module(GROUP_CASES, regs)
    rng = np.random.default_rng(2)
    for i, (m, ns, k, dt) in enumerate(GROUP_CASES):
        npdt = _np_dtype(dt)
        x = rng.standard_normal((m, k)).astype(npdt)
        ws = [(rng.standard_normal((n, k)) / np.sqrt(k)).astype(npdt) for n in ns]
        ys = module[f"f{i}"](x, *ws)
        assert len(ys) == len(ns)
        for w, y in zip(ws, ys):
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            assert ref.shape == (m, w.shape[0])
            _assert_close(y.to_host(), ref, dt, GROUP_CASES[i], w.shape)


# batched products (attention's scores): (rows, n, k, dtype, the weights' leading dims): batch
# 1 f16 decode of the 100M model (3 query rows per kv head, 256 positions, head dim 64), batch
# 8 f32 (32 products), a tiny cache, bf16, rows not a multiple of a workgroup's
BATCHED_CASES = [(3, 256, 64, "f16", (1, 4)), (3, 256, 64, "f32", (8, 4)), (2, 48, 16, "f32", (2, 2)),
                 (1, 50, 32, "bf16", (3,)), (5, 37, 16, "f32", (2,))]


@pytest.mark.parametrize("regs", [(32, 16), (16, 8)], ids=["avx512", "avx2"])
def test_rowdot_batched_equals_numpy(regs):
    """y[b] = x[b] @ w[b]^T for each product of a batch (x [B, m, k], w [*lead, n, k] read as
    stored) within the single kernel's tolerance of float64 numpy."""
    from polyarch.compiler.kernels import name, rowdot_source

    module = _two_operand_module([
        (rowdot_source(m, n, k, dt, regs, batch=lead), name(m, n, k, dt, lead), f"tensor<{int(np.prod(lead))}x{m}x{k}x{dt}>",
         f"tensor<{'x'.join(map(str, lead))}x{n}x{k}x{dt}>", f"tensor<{int(np.prod(lead))}x{m}x{n}x{dt}>")
        for m, n, k, dt, lead in BATCHED_CASES])
    rng = np.random.default_rng(3)
    for i, (m, n, k, dt, lead) in enumerate(BATCHED_CASES):
        npdt = _np_dtype(dt)
        b = int(np.prod(lead))
        x = rng.standard_normal((b, m, k)).astype(npdt)
        w = (rng.standard_normal((*lead, n, k)) / np.sqrt(k)).astype(npdt)
        y = module[f"f{i}"](x, w).to_host()
        ref = np.einsum("bmk,bnk->bmn", x.astype(np.float64), w.reshape(b, n, k).astype(np.float64))
        assert ref.shape == (b, m, n)
        _assert_close(y, ref, dt, BATCHED_CASES[i])


# attention values (rowmix): (rows, positions n, head dim k, dtype, the values' leading dims):
# batch 1 f16 decode of the 100M model (3 query rows per kv head, 256 positions, head dim 64),
# batch 8 f32, verify's 15 rows (more than a register tile), a tiny cache, bf16, head dim 128
MIX_CASES = [(3, 256, 64, "f16", (1, 4)), (3, 256, 64, "f32", (8, 4)), (15, 40, 64, "f32", (1, 2)),
             (2, 48, 16, "f32", (2, 2)), (1, 50, 32, "bf16", (3,)), (4, 7, 128, "f16", (2,))]


@pytest.mark.parametrize("regs", [(32, 16), (16, 8)], ids=["avx512", "avx2"])
def test_rowmix_equals_numpy(regs):
    """y[b] = x[b] @ v[b] for each product of a batch (x [B, m, n], v [*lead, n, k] read as
    stored) within the rowdot kernels' tolerance of float64 numpy."""
    from polyarch.compiler.kernels import rowmix_source
    from polyarch.passes.rowdot import mix_name

    module = _two_operand_module([
        (rowmix_source(m, n, k, dt, lead, regs), mix_name(m, n, k, dt, lead), f"tensor<{int(np.prod(lead))}x{m}x{n}x{dt}>",
         f"tensor<{'x'.join(map(str, lead))}x{n}x{k}x{dt}>", f"tensor<{int(np.prod(lead))}x{m}x{k}x{dt}>")
        for m, n, k, dt, lead in MIX_CASES])
    rng = np.random.default_rng(4)
    for i, (m, n, k, dt, lead) in enumerate(MIX_CASES):
        npdt = _np_dtype(dt)
        b = int(np.prod(lead))
        x = rng.random((b, m, n)).astype(npdt)  # probabilities' magnitudes
        v = rng.standard_normal((*lead, n, k)).astype(npdt)
        y = module[f"f{i}"](x, v).to_host()
        ref = np.einsum("bmn,bnk->bmk", x.astype(np.float64), v.reshape(b, n, k).astype(np.float64))
        assert ref.shape == (b, m, k)
        _assert_close(y, ref, dt, MIX_CASES[i])


DYNAMIC_CASES = [(2048, 768), (302, 64), (255, 32)]  # n a multiple of 4, of 2 only, odd


@pytest.mark.parametrize("regs", [(32, 16), (16, 8)], ids=["avx512", "avx2"])
def test_rowdot_dynamic_rows_equals_numpy(regs):
    """The f32 rowdot of a dynamic row count (prefill's products) for row counts below, at and
    past its row tile and not a multiple of it, against float64 numpy within 1e-5 of the
    result's largest magnitude."""
    from polyarch.passes.rowdot import DYNAMIC

    module = _rowdot_module([(DYNAMIC, n, k, "f32") for n, k in DYNAMIC_CASES], regs)
    rng = np.random.default_rng(1)
    for i, (n, k) in enumerate(DYNAMIC_CASES):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        for m in (1, 3, 4, 5, 16, 19):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = module[f"f{i}"](x, w).to_host()
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            assert y.shape == (m, n)
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (n, k, m)


def test_decode_and_prefill_use_rowdot(tmp_path):
    """A --generate bundle's decode segment holds the hand-written executables (one per weight
    shape; q, k, v in one, gate and up in one), its prefill the dynamic-row ones (its prompt's
    rows) and the head's for the last token's row; decode writes its cache with index_put (a scatter; cpu
    only: test_generate's vulkan-pinned block keeps the where); the greedy tokens are
    transformers' (the bundle is verified at compile time, and checked here for 16 steps)."""
    import torch
    import transformers as T

    import polyarch
    from polyarch.runtime import load

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = T.LlamaForCausalLM(cfg).eval()
    path = str(tmp_path / "lm.pab")
    polyarch.compile(model, output=path, generate=True, max_context=48, tune="none")
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        segs = {s["name"]: z.read(s["member"]) for s in manifest["plans"][0]["segments"]}
    decode = b"".join(v for k, v in segs.items() if k.startswith("decode"))
    prefill = b"".join(v for k, v in segs.items() if k.startswith("prefill"))
    for shape in ("1x64_32_32x64", "1x64x64", "1x128_128x64", "1x64x128", "1x320x64"):  # q+k+v, o, gate+up, down, head
        assert f"polyarch_rowdot_{shape}_f32".encode() in decode, shape
    assert b"polyarch_rowdot_1x32x64_" not in decode and b"polyarch_rowdot_1x128x64_" not in decode  # k, v, gate, up alone
    # the attention scores: 2 query rows per kv head against the cache as stored (1 sequence x
    # 2 kv heads, 48 positions, head dim 16)
    assert b"polyarch_rowdot_b1x2_2x48x16_f32" in decode
    assert b"polyarch_rowmix_b1x2_2x48x16_f32" in decode  # and its values, read as cached too
    assert b"polyarch_rowdot_1x320x64_f32" in prefill  # the head: the last token's row
    for shape in ("64x64", "32x64", "128x64", "64x128"):  # the prompt's rows: a dynamic count
        assert f"polyarch_rowdot_Dx{shape}_f32".encode() in prefill and f"rowdot_1x{shape}_".encode() not in prefill
    # a cpu-only compile: decode writes its cache with index_put (a scatter), its positions an index input
    positions = next(i for i in manifest["phases"]["decode"]["signature"]["inputs"] if i["name"] == "positions")
    assert positions["index_range"]["max"] == 47 and "index_put" in positions["index_range"]["op"]
    prompt = [5, 17, 3, 99]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    with load(path) as b:
        assert b.manifest["plans"][0]["verification"]["status"] == "verified"
        assert list(b.generate(prompt, 16)) == ref


def test_rowdot_reads_strands_and_prefetches_16_bit_rows_for_several_rows():
    """The static-row kernel reads its rows in r strands (row %n + a * %sq) and prefetches each
    strand's next row for 16-bit weights and more than one row of x only (kernels._prefetch:
    measured on a Zen 2 host with the strands)."""
    from polyarch.compiler.kernels import rowdot_source

    for m, dt, expected in [(1, "f32", False), (5, "f32", False), (1, "f16", False), (2, "f16", True), (5, "bf16", True)]:
        for regs in ((32, 16), (16, 8)):
            src = rowdot_source(m, 2048, 768, dt, regs)
            assert ("memref.prefetch" in src) == expected, (m, dt, regs)
            assert "%sq = arith.divui %end, %cr" in src and "arith.muli %sq" in src
