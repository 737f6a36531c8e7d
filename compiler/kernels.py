"""Hand-written CPU dispatches that replace IREE's own code where it is measurably slower.

`rowdot`: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows of x (a decode step's matmul against
a weight kept as nn.Linear stores it, [out, in]). passes/rowdot.py turns such a matmul into a
call to a private declaration `@polyarch_rowdot_<M>x<N>x<K>_<dtype>` marked
`polyarch.kernel = "rowdot"`; `define` gives each declaration its body: a flow.dispatch of an
executable written here at the vector level (IREE's LLVM CPU backend lowers it; its lowering
strategy has nothing left to tile). Why: IREE 3.13 vectorises a matrix-vector product across
output rows and transposes each 16 x 16 weight tile in registers first; this one reads each
weight row along k with R rows x M accumulators of 16 lanes, reduces once per row, and splits
the rows into workgroups of about 128. On a 2-core Xeon, a chain of 48 [2048 x 768] /
[768 x 2048] f32 products (300 MB): IREE 13.2-14.4 ms, this 8.7-10.0, PyTorch 8.5-9.0
(docs/cpu-speed.md). Accumulation is in f32 for 16-bit weights.

Only the llvm-cpu target compiles these executables: the pass is run on cpu segments only."""

import functools
import math
import os

from ..passes.rowdot import DYNAMIC, LANES, mix_name, parse_mix_name, parse_name, supported
from ..passes.rowdot import kernel_name as name
from ..runtime.identity import cpu_identity

WG_ROWS = 128  # weight rows per workgroup (a 2048-row weight: 16 workgroups)
READ, WRITE = '"ReadOnly|Indirect"', "Indirect"  # binding flags: an input, the result


def _layout(flags):
    return ("#hal.pipeline.layout<bindings = ["
            + ", ".join(f"#hal.pipeline.binding<storage_buffer, {f}>" for f in flags) + "], flags = Indirect>")


LAYOUT = _layout([READ, READ, WRITE])  # w, x read; y written
LAYOUT_DYNAMIC = LAYOUT.replace("<bindings", "<constants = 1, bindings")  # + the row count (i32)


@functools.lru_cache(maxsize=1)
def _host_isa() -> frozenset:
    """This host's code-generation ISA features (runtime/identity.py, as a device profile names them)."""
    return frozenset(cpu_identity()["isa"])


def host_bf16_dot() -> bool:
    """AVX512-BF16 (vdpbf16ps: pairs of bf16 products summed into f32 lanes) on this host."""
    return "avx512_bf16" in _host_isa()


def host_vector_regs() -> tuple:
    """(vector registers, f32 lanes each) of this host's widest vectors: the cpu target compiles
    for the host (--iree-llvmcpu-target-cpu=host). AVX-512: 32 x 16; otherwise 16 x 8 (AVX2)."""
    return (32, 16) if "avx512f" in _host_isa() else (16, 8)


def _rows_per_step(m: int, n: int, regs: int) -> int:
    """Weight rows read together (r): r x m accumulators, r weight vectors and one x vector
    live at once within the registers, r dividing n. With 7 or 8 rows of x on 32 registers,
    r x m may fill all 32 (4 x 8: the weight and x vectors then come from the cache as FMA
    operands): on a 2-core Zen 4 EPYC, chains of 48 [2048 x 768] / [768 x 2048] products,
    r = 2 against 4, f32 8 rows 15.8-19.9 / 11.9-13.7 ms, 7 rows 15.0-16.0 / 11.2-12.0, f16
    7 rows 7.8-8.2 / 6.7-7.0, bf16 8 rows 6.5-6.7 / 5.5-8.0; the 100M Llama's batch-8 f32
    decode step 16.8 -> 14.1 ms (A B B A x 3)."""
    for r in (8, 4, 2, 1):
        if n % r:
            continue
        if r * m <= 24 and r * m + r + 1 <= regs - 1:
            return r
        if regs >= 32 and 7 <= m <= 8 and r * m <= 32:
            return r
    return 1


def rowdot_source(m: int, n: int, k: int, dtype: str, regs: tuple | None = None, bf16_dot: bool | None = None,
                  batch: int = 0) -> str:
    """MLIR text (IREE's dialects) of the executable and the private func.func that dispatches
    it. regs: (vector registers, f32 lanes) to write it for (default: this host's); bf16_dot:
    bf16 products with AVX512-BF16's vdpbf16ps, 32 a step (default: where the host has it and
    k is a multiple of 32), else widened to f32 and multiplied by FMAs."""
    assert supported(m, n, k, dtype, batch), (m, n, k, dtype, batch)
    if batch:
        return _batched_source(batch, m, n, k, dtype, regs, bf16_dot)
    if m == DYNAMIC:
        return _dynamic_source(n, k, dtype, regs)
    if isinstance(n, tuple):
        return _group_source(m, n, k, dtype, regs, bf16_dot)
    nregs, lanes = regs or host_vector_regs()  # k is a multiple of LANES (16), so of 8 too
    dot = _bf16_dot(dtype, k, lanes, bf16_dot)
    r = _rows_per_step(m, n, nregs)
    wg = _wg_rows(n, r)
    fn, t = name(m, n, k, dtype), dtype
    return "\n".join([_prologue(fn, m, n, k, t, r, wg, lanes, 32 if dot else lanes, strided=True),
                      *_rows(m, n, k, t, r, lanes, dot),
                      f"""      }}
      return
    }}
  }}
}}
func.func private @{fn}(%x: tensor<{m}x{k}x{t}>, %w: tensor<{n}x{k}x{t}>) -> tensor<{m}x{n}x{t}> {{
  %y = flow.dispatch @{fn}_ex::@{fn}_d(%w, %x) : (tensor<{n}x{k}x{t}>, tensor<{m}x{k}x{t}>) -> tensor<{m}x{n}x{t}>
  return %y : tensor<{m}x{n}x{t}>
}}"""])


def _bf16_dot(dtype, k, lanes, bf16_dot):
    """Whether bf16 products go through vdpbf16ps (rowdot_source's bf16_dot)."""
    return dtype == "bf16" and k % 32 == 0 and lanes == 16 and (host_bf16_dot() if bf16_dot is None else bf16_dot)


def _wg_rows(n, r):
    """Weight rows a workgroup reads: about WG_ROWS, a multiple of r."""
    return max(r, min(WG_ROWS // r * r, -(-n // r) * r))



def _group_source(m, ns, k, dtype, regs=None, bf16_dot=None):
    """One dispatch for the products of one x by several weights of the same k (a layer's q, k
    and v projections; its gate and up): y_i[m, n_i] = sum_k x[m, k] * w_i[n_i, k]. Its
    workgroups are each weight's, one after the other (workgroup g serves the weight whose range
    holds it), each as the single-weight kernel's. Bindings: the weights, x, then the results.
    The 100M Llama's f16 decode call: 177 dispatches instead of 201 (its 150 barriers stay:
    q, k and v, gate and up already ran side by side); time per token level within this host's
    noise (docs/cpu-speed.md)."""
    nregs, lanes = regs or host_vector_regs()
    dot = _bf16_dot(dtype, k, lanes, bf16_dot)
    j, fn, t = len(ns), name(m, ns, k, dtype), dtype
    layout = _layout([READ] * (j + 1) + [WRITE] * j)
    o, first = [], 0
    for i, n in enumerate(ns):
        r = _rows_per_step(m, n, nregs)
        wg = _wg_rows(n, r)
        last = first + -(-n // wg)
        o += [f"""      %lo{i} = arith.constant {first} : index
      %hi{i} = arith.constant {last} : index
      %ge{i} = arith.cmpi uge, %wgid, %lo{i} : index
      %lt{i} = arith.cmpi ult, %wgid, %hi{i} : index
      %in{i} = arith.andi %ge{i}, %lt{i} : i1
      scf.if %in{i} {{
      %w = {_binding(layout, i, READ, f"{n}x{k}", t)}
      %y = {_binding(layout, j + 1 + i, WRITE, f"{m}x{n}", t)}
      %wg = arith.subi %wgid, %lo{i} : index""", _loop_head(n, k, r, wg, 32 if dot else lanes, 0, True, False),
              *_rows(m, n, k, t, r, lanes, dot), "      }\n      }"]
        first = last
    tx, tws, tys = f"tensor<{m}x{k}x{t}>", [f"tensor<{n}x{k}x{t}>" for n in ns], [f"tensor<{m}x{n}x{t}>" for n in ns]
    ws, ys = ", ".join(f"%w{i}" for i in range(j)), ", ".join(f"%y#{i}" for i in range(j))
    return "\n".join([_header(fn, layout, first), f"""      %c0 = arith.constant 0 : index
      %z = arith.constant dense<0.0> : vector<{lanes}xf32>
      %x = {_binding(layout, j, READ, f"{m}x{k}", t)}
      %wgid = hal.interface.workgroup.id[0] : index""", *o, f"""      return
    }}
  }}
}}
func.func private @{fn}(%x: {tx}, {", ".join(f"%w{i}: {tw}" for i, tw in enumerate(tws))}) -> ({", ".join(tys)}) {{
  %y:{j} = flow.dispatch @{fn}_ex::@{fn}_d({ws}, %x) : ({", ".join(tws)}, {tx}) -> ({", ".join(tys)})
  return {ys} : {", ".join(tys)}
}}"""])


def _batched_source(batch, m, n, k, dtype, regs=None, bf16_dot=None):
    """`batch` products y[b] = x[b] @ w[b]^T (x [batch, m, k], w [batch, n, k]; batch a tuple:
    w [*batch, n, k], the cache's [sequences, key/value heads, positions, head dim]) in one dispatch:
    workgroups (rows, b), each as the single kernel's on its batch's rows of the flattened
    memrefs. A decode step's attention scores: its queries (the heads sharing a key/value head,
    rows of x) against the cached keys of that head (w, as the cache stores them)."""
    nregs, lanes = regs or host_vector_regs()
    dot = _bf16_dot(dtype, k, lanes, bf16_dot)
    r = _rows_per_step(m, n, nregs)
    wg = _wg_rows(n, r)
    fn, t = name(m, n, k, dtype, batch), dtype
    lead = batch if isinstance(batch, tuple) else (batch,)  # the weights' leading dims
    batch = math.prod(lead)
    header = _header(fn, LAYOUT, -(-n // wg), groups_y=batch)
    tx, ty = f"tensor<{batch}x{m}x{k}x{t}>", f"tensor<{batch}x{m}x{n}x{t}>"
    tw = f"tensor<{'x'.join(map(str, lead))}x{n}x{k}x{t}>"
    return "\n".join([header, f"""      %c0 = arith.constant 0 : index
      %z = arith.constant dense<0.0> : vector<{lanes}xf32>
      %w = {_binding(LAYOUT, 0, READ, f"{batch * n}x{k}", t)}
      %x = {_binding(LAYOUT, 1, READ, f"{batch * m}x{k}", t)}
      %y = {_binding(LAYOUT, 2, WRITE, f"{batch * m}x{n}", t)}
      %wg = hal.interface.workgroup.id[0] : index
      %bi = hal.interface.workgroup.id[1] : index
      %cbn = arith.constant {n} : index
      %cbm = arith.constant {m} : index
      %wofs = arith.muli %bi, %cbn : index
      %xofs = arith.muli %bi, %cbm : index""", _loop_head(n, k, r, wg, 32 if dot else lanes, 0, True, False),
                      *_rows(m, n, k, t, r, lanes, dot, batch), "      }",
                      _flat_call(fn, t, (tx, f"{batch * m}x{k}"), (tw, f"{batch * n}x{k}"), (ty, f"{batch * m}x{n}"))])


def _flat_call(fn, t, x, w, y):
    """The end of a batched executable's function and the private func.func that dispatches it
    on its operands flattened to 2-D: x, w, y each (tensor type, the flat shape "RxC")."""
    (tx, x2), (tw, w2), (ty, y2) = x, w, y
    return f"""      return
    }}
  }}
}}
func.func private @{fn}(%x: {tx}, %w: {tw}) -> {ty} {{
  %x2 = flow.tensor.reshape %x : {tx} -> tensor<{x2}x{t}>
  %w2 = flow.tensor.reshape %w : {tw} -> tensor<{w2}x{t}>
  %y2 = flow.dispatch @{fn}_ex::@{fn}_d(%w2, %x2) : (tensor<{w2}x{t}>, tensor<{x2}x{t}>) -> tensor<{y2}x{t}>
  %y = flow.tensor.reshape %y2 : tensor<{y2}x{t}> -> {ty}
  return %y : {ty}
}}"""


def _mix_tiles(m: int, k: int, regs: int, lanes: int) -> tuple:
    """(rows of x, vectors of k) a rowmix pass keeps in accumulators: rows x vectors
    accumulators, the vectors of one position's values and one broadcast within the registers."""
    kv = k // lanes
    kt = next(c for c in (8, 4, 2, 1) if kv % c == 0 and 2 * c + c + 1 <= regs - 1)
    mt = max(1, min(m, (regs - 2 - kt) // kt, 24 // kt))
    return mt, kt


def _mix_tile(rows, cols, w_rows, x_rows, k, n, t, lanes):
    """rowmix's loop over the positions for x's `rows` and the values' vectors `cols` (of
    `lanes` f32 lanes): accumulated, then rounded to t and stored."""
    v, vt, wide = f"vector<{lanes}xf32>", f"vector<{lanes}x{t}>", t != "f32"
    tag, accs = f"{rows[0]}_{cols[0]}", [(r, c) for r in rows for c in cols]
    types = ", ".join([v] * len(accs))
    o = [f"      %s{tag}:{len(accs)} = scf.for %j = %c0 to %cn step %c1 iter_args("
         + ", ".join(f"%a{r}_{c} = %z" for r, c in accs) + f") -> ({types}) {{",
         "        %wr = arith.addi %wofs, %j : index"]
    for c in cols:
        o.append(f"        %v{c}{'r' if wide else ''} = vector.load %w[%wr, %k{c}] : memref<{w_rows}x{k}x{t}>, {vt}")
        if wide:
            o.append(f"        %v{c} = arith.extf %v{c}r : {vt} to {v}")
    for r in rows:
        o.append(f"        %p{r}{'r' if wide else ''} = memref.load %x[%xr{r}, %j] : memref<{x_rows}x{n}x{t}>")
        if wide:
            o.append(f"        %p{r} = arith.extf %p{r}r : {t} to f32")
        o.append(f"        %q{r} = vector.broadcast %p{r} : f32 to {v}")
        o += [f"        %b{r}_{c} = vector.fma %v{c}, %q{r}, %a{r}_{c} : {v}" for c in cols]
    o += ["        scf.yield " + ", ".join(f"%b{r}_{c}" for r, c in accs) + " : " + types, "      }"]
    for i, (r, c) in enumerate(accs):
        val = f"%s{tag}#{i}"
        if wide:
            o.append(f"      %u{tag}_{i} = arith.truncf {val} : {v} to {vt}")
            val = f"%u{tag}_{i}"
        o.append(f"      vector.store {val}, %y[%xr{r}, %k{c}] : memref<{x_rows}x{k}x{t}>, {vt}")
    return o


def rowmix_source(m: int, n: int, k: int, dtype: str, batch, regs: tuple | None = None) -> str:
    """`batch` products y[b] = x[b] @ v[b] with v as stored (x [B, m, n], v [*batch, n, k], y
    [B, m, k]): a decode step's attention values, its probabilities (rows of x: the query heads
    of a key/value head) against that head's cached values. A workgroup per product: for each
    position j it loads v[j]'s k values (vectors of `lanes`) and adds x[r, j] times them to
    row r's accumulators (f32), rows and vectors in register tiles (`_mix_tiles`). IREE's own
    code packed each layer's value cache for its batch_matmul first (batch 1 f16 of the 100M
    model: an encode 8.4 us and the product 4.4 us a layer)."""
    nregs, lanes = regs or host_vector_regs()
    lead = batch if isinstance(batch, tuple) else (batch,)
    b = math.prod(lead)
    mt, kt = _mix_tiles(m, k, nregs, lanes)
    fn, t = mix_name(m, n, k, dtype, lead), dtype
    o = [_header(fn, LAYOUT, b), f"""      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %z = arith.constant dense<0.0> : vector<{lanes}xf32>
      %w = {_binding(LAYOUT, 0, READ, f"{b * n}x{k}", t)}
      %x = {_binding(LAYOUT, 1, READ, f"{b * m}x{n}", t)}
      %y = {_binding(LAYOUT, 2, WRITE, f"{b * m}x{k}", t)}
      %bi = hal.interface.workgroup.id[0] : index
      %cn = arith.constant {n} : index
      %cm = arith.constant {m} : index
      %wofs = arith.muli %bi, %cn : index
      %xofs = arith.muli %bi, %cm : index"""]
    o += [f"      %c{j}i = arith.constant {j} : index" for j in range(m)]
    o += [f"      %xr{j} = arith.addi %xofs, %c{j}i : index" for j in range(m)]
    o += [f"      %k{c} = arith.constant {c * lanes} : index" for c in range(k // lanes)]
    for r0 in range(0, m, mt):
        for c0 in range(0, k // lanes, kt):
            o += _mix_tile(list(range(r0, min(m, r0 + mt))), list(range(c0, c0 + kt)), b * n, b * m, k, n, t, lanes)
    tx, tw, ty = f"tensor<{b}x{m}x{n}x{t}>", f"tensor<{'x'.join(map(str, lead))}x{n}x{k}x{t}>", f"tensor<{b}x{m}x{k}x{t}>"
    o.append(_flat_call(fn, t, (tx, f"{b * m}x{n}"), (tw, f"{b * n}x{k}"), (ty, f"{b * m}x{k}")))
    return "\n".join(o)


def _prologue(fn, m, n, k, t, r, wg, lanes, step, tile=0, strided=False):
    """The executable up to the loop over this workgroup's rows (wg of them, r at a time). With
    m DYNAMIC the row count %cm is the export's workload and a push constant (LAYOUT_DYNAMIC),
    %full of the rows in tiles of `tile`. strided: the loop runs %i over the %sq = rows / r
    rows of each of r strands (the rows a step reads are %n + a * %sq, `_rows`), else %i steps
    by r over the rows (%n + a)."""
    dynamic = m == DYNAMIC
    layout = LAYOUT_DYNAMIC if dynamic else LAYOUT
    rows, dims = ("?", "{%cm}") if dynamic else (m, "")
    # what only the dynamic executable has: its workload, %c1, the row count
    workload, c1, count = ("", "", "") if not dynamic else (
        ", %rows: index", "\n      %c1 = arith.constant 1 : index",
        f"\n      %rows32 = hal.interface.constant.load layout({layout}) ordinal(0) : i32"
        "\n      %cm = arith.index_castui %rows32 : i32 to index")
    return "\n".join([
        _header(fn, layout, -(-n // wg), workload),
        f"""      %c0 = arith.constant 0 : index{c1}
      %z = arith.constant dense<0.0> : vector<{lanes}xf32>{count}
      %w = {_binding(layout, 0, READ, f"{n}x{k}", t)}
      %x = {_binding(layout, 1, READ, f"{rows}x{k}", t, dims)}
      %y = {_binding(layout, 2, WRITE, f"{rows}x{n}", t, dims)}
      %wg = hal.interface.workgroup.id[0] : index""",
        _loop_head(n, k, r, wg, step, tile, strided, dynamic)])



def _binding(layout, i, flags, shape, t, dims=""):
    return (f'hal.interface.binding.subspan layout({layout}) binding({i}) alignment(64) offset(%c0) '
            f'flags({flags}) : memref<{shape}x{t}>{dims}')


def _header(fn, layout, groups, workload="", groups_y=1):
    """The executable's source and export (`groups` workgroups along x, `groups_y` along y), up
    to its function's body."""
    return f"""hal.executable.source private @{fn}_ex {{
  hal.executable.export public @{fn}_d ordinal(0) layout({layout}) count(%dev: !hal.device{workload}) -> (index, index, index) {{
    %g = arith.constant {groups} : index
    %gy = arith.constant {groups_y} : index
    %c1 = arith.constant 1 : index
    hal.return %g, %gy, %c1 : index, index, index
  }} attributes {{translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<Default>>}}
  builtin.module {{
    func.func @{fn}_d() {{"""


def _loop_head(n, k, r, wg, step, tile, strided, dynamic):
    """From the workgroup's first row (%nb, of workgroup %wg) to the loop over its rows (see
    _prologue), the row %n of its step defined."""
    ctile, full = ("", "") if not dynamic else (
        f"\n      %ctile = arith.constant {tile} : index",
        "\n      %rem = arith.remui %cm, %ctile : index\n      %full = arith.subi %cm, %rem : index")
    loop = ("%sq = arith.divui %end, %cr : index\n      %c1s = arith.constant 1 : index\n"
            "      scf.for %i = %c0 to %sq step %c1s {" if strided else "scf.for %i = %c0 to %end step %cr {")
    return f"""      %cwg = arith.constant {wg} : index
      %cn = arith.constant {n} : index
      %cr = arith.constant {r} : index{ctile}
      %ck = arith.constant {k} : index
      %cl = arith.constant {step} : index{full}
      %nb = arith.muli %wg, %cwg : index
      %left = arith.subi %cn, %nb : index
      %end = arith.minui %left, %cwg : index
      {loop}
        %n = arith.addi %nb, %i : index"""


def _prefetch(m: int, dtype: str) -> bool:
    """Whether rowdot's static-row kernel prefetches each strand's next row (`_products`): for
    16-bit weights and more than one row of x. With the rows read in strands (`_rows`), on a
    2-core Zen 2 EPYC (AVX2), chains of 48 [2048 x 768] / [768 x 2048] products A B B A, with
    against without: f16 1 row 3.98 / 3.79 ms, 2 rows 4.64 / 4.76; f32 5 rows 9.39 / 9.26 (one
    row of f32 did not gain before the strands either: 11.1 / 9.3-9.6). Before the strands the
    prefetch gained for all but one row of f32, on Zen 2 and on a 2-core AVX-512 Xeon (the Xeon
    is not measured with strands). On a 2-core Zen 4 EPYC (AVX-512) with the strands, without
    against with: f16 1 row 5.55 / 5.93, 4 rows 6.41 / 6.43; f32 1 row 8.92 / 9.67."""
    return m > 1 and dtype != "f32"


def _rows(m, n, k, t, r, lanes, dot=False, batch=0):
    """The body of the loop over rows: r rows x m accumulators along k, then reduced and stored,
    each strand's next row prefetched where `_prefetch` says (clamped to the last row).

    The rows a step reads are one from each of r strands: a workgroup's rows split into r
    contiguous runs (row %n + a * %sq of strand a), so that each weight stream walks its own
    run of memory from row to row, rather than r neighbouring rows read side by side (r
    streams within one 4 KiB page when rows are short, which the hardware prefetcher, one
    stream a page, did not follow). On a 2-core Zen 2 EPYC, chains of 48 [2048 x 768] /
    [768 x 2048] products A B B A, neighbouring against strands: f32 1 row 8.67 / 6.53 ms,
    5 rows 10.46 / 9.22; f16 1 row 5.40 / 3.99 (in the 100M model's f16 decode, products of
    768-wide rows had streamed at 21 GB/s, 2048-wide ones at 32); on a 2-core Zen 4 EPYC
    (AVX-512): f32 1 row 11.83 / 10.20, f16 1 row 8.79 / 6.32, f16 4 rows 8.74 / 6.45."""
    prefetch = _prefetch(m, t)
    o = [f"        %c{j}i = arith.constant {j} : index" for j in range(max(r, m))]
    o += [f"        %o{a} = arith.muli %sq, %c{a}i : index\n        %n{a} = arith.addi %n, %o{a} : index"
          for a in range(r)]
    if prefetch:  # the rows to prefetch (%pn0..): each strand's next, clamped to the last row
        o.append(f"        %nlast = arith.constant {n - 1} : index")
        o += [f"        %pn{a}u = arith.addi %n{a}, %c1s : index\n        %pn{a} = arith.minui %pn{a}u, %nlast : index"
              for a in range(r)]
    if not batch:
        return o + _products(n, k, t, r, m, lanes, 8, lambda b: f"%c{b}i", m, dot, prefetch=prefetch)
    # a batch's rows in the flattened [batch * rows, ...] memrefs: offsets %wofs (weights), %xofs (x, y)
    o += [f"        %wn{a} = arith.addi %n{a}, %wofs : index" for a in range(r)]
    o += [f"        %pw{a} = arith.addi %pn{a}, %wofs : index" for a in range(r) if prefetch]
    o += [f"        %xr{j} = arith.addi %xofs, %c{j}i : index" for j in range(m)]
    return o + _products(n, k, t, r, m, lanes, 8, lambda b: f"%xr{b}", batch * m, dot, prefetch=prefetch,
                         w_rows=batch * n, w_row=lambda a: f"%wn{a}", pw_row=lambda a: f"%pw{a}")


def _products(n, k, t, r, rows, lanes, indent, x_row, x_rows, dot=False, prefetch=False, w_rows=None,
              w_row=lambda a: f"%n{a}", pw_row=lambda a: f"%pn{a}"):
    """r weight rows (%n0..) x `rows` rows of x (x_row(b): the index of row b; x_rows: x's row
    count as its memref type says it) of accumulators along k, then reduced and stored.
    prefetch: each step also prefetches the rows %pn0.. at the same k (the static kernel's
    next rows, `_rows`). Before the static kernel read its rows in strands, the prefetch of the
    next r neighbouring rows gained on a chain of 48 [2048 x 768] / [768 x 2048] products on
    a 2-core Xeon, A B B A: f16 1 row 9.0 -> 6.5 ms, 8 rows 19.4 -> 10.8; bf16 1 row 7.8 ->
    6.2; f32 4 rows 15.0 -> 12.0, 5 rows 16.2 -> 13.5, 8 rows 18.6 -> 14.5; f32 1 row within
    noise. The dynamic-row kernel (prefill, compute-bound) does not prefetch. w_rows: the
    weight memref's rows (default n); w_row(a), pw_row(a): the weight rows read and prefetched
    (default %n<a>, %pn<a>; a batch's are offset in a flattened memref, its results stored at %n<a>)."""
    p, v, vt = " " * indent, f"vector<{lanes}xf32>", f"vector<{2 * lanes if dot else lanes}x{t}>"
    wide = t != "f32" and not dot  # 16-bit inputs are widened to f32 after each load (but for vdpbf16ps)
    accs = [(a, b) for a in range(r) for b in range(rows)]
    types = ", ".join([v] * len(accs))
    o = [f"{p}%s:{len(accs)} = scf.for %kk = %c0 to %ck step %cl iter_args("
         + ", ".join(f"%a{a}_{b} = %z" for a, b in accs) + f") -> ({types}) {{"]

    def load(dst, src, idx, shape):
        o.append(f"{p}  {dst}{'r' if wide else ''} = vector.load {src}[{idx}, %kk] : memref<{shape}x{t}>, {vt}")
        if wide:
            o.append(f"{p}  {dst} = arith.extf {dst}r : {vt} to {v}")

    wn = w_rows or n
    for a in range(r):
        load(f"%w{a}", "%w", w_row(a), f"{wn}x{k}")
    if prefetch:
        o += [f"{p}  memref.prefetch %w[{pw_row(a)}, %kk], read, locality<3>, data : memref<{wn}x{k}x{t}>"
              for a in range(r)]
    for b in range(rows):
        load(f"%x{b}", "%x", x_row(b), f"{x_rows}x{k}")
        o += [f'{p}  %b{a}_{b} = llvm.call_intrinsic "llvm.x86.avx512bf16.dpbf16ps.512"(%a{a}_{b}, %x{b}, %w{a}) : '
              f'({v}, {vt}, {vt}) -> {v}' if dot else f"{p}  %b{a}_{b} = vector.fma %w{a}, %x{b}, %a{a}_{b} : {v}"
              for a in range(r)]
    o.append(f"{p}  scf.yield " + ", ".join(f"%b{a}_{b}" for a, b in accs) + " : " + types)
    o.append(f"{p}}}")
    lines, sums = _reduce([f"%s#{i}" for i in range(len(accs))], lanes, "t", p)
    o += lines
    for i, (a, b) in enumerate(accs):
        if t != "f32":
            o.append(f"{p}%u{i} = arith.truncf {sums[i]} : f32 to {t}")
        o.append(f"{p}memref.store {f'%u{i}' if t != 'f32' else sums[i]}, %y[{x_row(b)}, %n{a}] : "
                 f"memref<{x_rows}x{n}x{t}>")
    return o


def _tile(n, k, t, r, rows, lanes, indent):
    """A loop over x's rows `rows` at a time: r weight rows x `rows` rows of accumulators along
    k, reduced and stored."""
    o = [f"{' ' * indent}  %m{q} = arith.addi %mm, %c{q}i : index" for q in range(rows)]
    return o + _products(n, k, t, r, rows, lanes, indent + 2, lambda q: f"%m{q}", "?")


def _dynamic_source(n, k, dtype, regs=None):
    """rowdot of a dynamic row count m (f32): a workgroup per WG_ROWS / 2 weight rows, each
    multiplying r weight rows by ROW_TILE rows of x at a time (r x ROW_TILE accumulators), the
    last m % ROW_TILE rows one at a time; m reaches the executable as a push constant."""
    nregs, lanes = regs or host_vector_regs()
    tile = 4 if nregs >= 32 else 2
    r = next(r for r in (4, 2, 1) if n % r == 0)
    wg = max(r, min(WG_ROWS // 2 // r * r, -(-n // r) * r))  # 64 rows: every row of x reads them from L2
    fn, t = name(DYNAMIC, n, k, dtype), dtype
    o = [_prologue(fn, DYNAMIC, n, k, t, r, wg, lanes, lanes, tile)]
    o += [f"        %c{j}i = arith.constant {j} : index" for j in range(max(r, tile))]
    o += [f"        %n{a} = arith.addi %n, %c{a}i : index" for a in range(r)]
    o.append("        scf.for %mm = %c0 to %full step %ctile {")
    o += _tile(n, k, t, r, tile, lanes, 8)
    o.append("        }")
    o.append("        scf.for %mm = %full to %cm step %c1 {")
    o += _tile(n, k, t, r, 1, lanes, 8)
    o.append(f"""        }}
      }}
      return
    }}
  }}
}}
func.func private @{fn}(%x: tensor<?x{k}x{t}>, %w: tensor<{n}x{k}x{t}>) -> tensor<?x{n}x{t}> {{
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x{k}x{t}>
  %m32 = arith.index_cast %m : index to i32
  %y = flow.dispatch @{fn}_ex::@{fn}_d[%m](%m32, %w, %x) : (i32, tensor<{n}x{k}x{t}>, tensor<?x{k}x{t}>{{%m}}) -> tensor<?x{n}x{t}>{{%m}}
  return %y : tensor<?x{n}x{t}>
}}""")
    return "\n".join(o)


def _tree(lanes: int, count: int) -> tuple:
    """The shuffles that reduce `count` (a power of two, at most `lanes`) accumulators of
    `lanes` lanes together: pairs of vectors are halved level by level (each 2s-lane block of
    x and y gives s lanes of x + s lanes of y, the low and high halves added), then the last
    vector's blocks are added within it until each accumulator's sum is whole in a lane.
    -> ([(lo, hi)] masks of the levels that pair vectors, [mask] of the in-vector levels,
    {accumulator: a lane holding its sum}), checked by simulating the sums."""
    import numpy as np

    pair, within = [], []
    vecs = [np.eye(count)[i][:, None] * np.ones((count, lanes)) for i in range(count)]  # [acc, lane] weights
    s = lanes // 2
    while len(vecs) > 1:
        lo = [i for b in range(0, lanes, 2 * s) for i in (*range(b, b + s), *range(lanes + b, lanes + b + s))]
        hi = [i + s for i in lo]
        pair.append((lo, hi))
        nxt = []
        for x, y in zip(vecs[0::2], vecs[1::2]):
            both = np.concatenate([x, y], axis=1)
            nxt.append(both[:, lo] + both[:, hi])
        vecs, s = nxt, s // 2
    v = vecs[0]
    while s >= 1:
        mask = [i ^ s for i in range(lanes)]  # swap neighbouring blocks of s lanes
        within.append(mask)
        v = v + v[:, mask]
        s //= 2
    lane = {}
    for a in range(count):
        hits = [i for i in range(lanes) if v[a, i] == lanes and v[:, i].sum() == lanes]
        assert hits, (lanes, count, a)
        lane[a] = hits[0]
    return pair, within, lane


def _reduce(values: list, lanes: int, prefix: str, indent: str) -> tuple:
    """MLIR lines that reduce each vector<lanes x f32> SSA value of `values` to its sum (groups of
    a power of two through _tree's shuffles, a single one by a reassociated vector.reduction).
    -> (lines, [SSA name of each sum, f32])."""
    v = f"vector<{lanes}xf32>"
    out, sums, at, g = [], [None] * len(values), 0, 0
    while at < len(values):
        count = 1 << min(len(values) - at, lanes).bit_length() - 1
        group = values[at:at + count]
        if count == 1:
            out.append(f"{indent}%{prefix}{at} = vector.reduction <add>, {group[0]} fastmath<reassoc> : {v} into f32")
            sums[at] = f"%{prefix}{at}"
        else:
            pair, within, lane = _tree(lanes, count)
            cur, level = list(group), 0
            for lo, hi in pair:
                nxt = []
                for j, (x, y) in enumerate(zip(cur[0::2], cur[1::2])):
                    n = f"%{prefix}g{g}l{level}_{j}"
                    out.append(f"{indent}{n}a = vector.shuffle {x}, {y} {lo} : {v}, {v}")
                    out.append(f"{indent}{n}b = vector.shuffle {x}, {y} {hi} : {v}, {v}")
                    out.append(f"{indent}{n} = arith.addf {n}a, {n}b fastmath<reassoc> : {v}")
                    nxt.append(n)
                cur, level = nxt, level + 1
            for mask in within:
                n = f"%{prefix}g{g}l{level}"
                out.append(f"{indent}{n}a = vector.shuffle {cur[0]}, {cur[0]} {mask} : {v}, {v}")
                out.append(f"{indent}{n} = arith.addf {cur[0]}, {n}a fastmath<reassoc> : {v}")
                cur, level = [n], level + 1
            for a in range(count):
                out.append(f"{indent}%{prefix}{at + a} = vector.extract {cur[0]}[{lane[a]}] : f32 from {v}")
                sums[at + a] = f"%{prefix}{at + a}"
            g += 1
        at += count
    return out, sums


def define(path: str) -> int:
    """Give every rowdot (and rowmix) declaration of the module at `path` (bytecode, torch input) its
    body, in place. Runs in IREE's own MLIR context (it knows torch and IREE's dialects).
    -> the number defined (0: the file is left as it is)."""
    from iree.compiler import ir

    with ir.Context(), ir.Location.unknown():
        with open(path, "rb") as f:
            module = ir.Module.parse(f.read())
        decls = []
        for op in module.body.operations:
            if op.operation.name == "func.func" and "polyarch.kernel" in op.attributes:
                sym = ir.StringAttr(op.attributes["sym_name"]).value
                mix, shape = parse_mix_name(sym), parse_name(sym)
                if not (shape or mix):
                    raise ValueError(f"unknown polyarch kernel declaration @{sym}")
                decls.append((op, shape, mix))
        if not decls:
            return 0
        for op, shape, mix in decls:
            body = ir.Module.parse(rowmix_source(*mix) if mix else rowdot_source(*shape[:4], batch=shape[4]))
            ip = ir.InsertionPoint(op)
            for new in list(body.body.operations):
                new.operation.clone(ip=ip)
            op.operation.erase()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            module.operation.write_bytecode(f)
        os.replace(tmp, path)
        return len(decls)
