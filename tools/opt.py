"""polyarch-opt: run polyarch passes on an .mlir file (torch dialect) and print the result."""

import sys

import click

from ..errors import PolyarchError

SPLIT = "// -----"


def _pass_help() -> str:
    import inspect

    from ..passes import PASSES

    lines = []
    for p in PASSES.values():
        doc = inspect.getmodule(p).__doc__ or ""
        lines.append(f"  {doc.strip().splitlines()[0]}")
        for name, help in p.options().items():
            lines.append(f"      {name}: {help}")
    return "\n".join(lines)


def _run_one(text, pipeline, elide_large, where):
    """The module after the passes, as text; PolyarchError or click error on failure."""
    from torch_mlir import ir

    from ..dialects import polyarch as pa
    from ..dialects.polyarch import make_context
    from ..passes import run_pipeline

    with make_context(), ir.Location.unknown():
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise click.ClickException(f"invalid MLIR in {where}: {e}")
        try:
            pa.verify(module)
        except PolyarchError as e:
            raise PolyarchError(f"input: {e.what}", e.where, e.fix) from None
        run_pipeline(module, pipeline)
        limit = 16 if elide_large else None
        return module.operation.get_asm(large_elements_limit=limit, large_resource_limit=64 if elide_large else None,
                                        enable_debug_info=False)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="PLACEHOLDER")
@click.argument("input", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("-p", "--pass-pipeline", "pipeline", default="", show_default=False,
              help="Passes to run, e.g. 'annotate-costs,assign-devices{devices=cpu,vulkan},outline-segments' "
                   "(default: none: the input is only verified).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-", help="Where to write the module (default stdout).")
@click.option("--elide-large/--no-elide-large", default=True, show_default=True, help="Elide large constants and resources when printing.")
@click.option("--split-input-file", "split", is_flag=True,
              help=f"Treat each '{SPLIT}'-separated chunk of INPUT as its own module: each is printed, or its "
                   "error as 'error: ...', separated by the same line; the exit status is 1 if any failed "
                   "(for verifier tests).")
def cli(input: str, pipeline: str, output: str, elide_large: bool, split: bool) -> None:
    """Run polyarch passes on INPUT (a torch-dialect .mlir file, '-' for stdin).

    The module is verified before the passes and after each one: the polyarch.transfer
    contracts and every polyarch.* attribute read through its typed accessor
    (dialects/polyarch.py).

    \b
    Example:
      polyarch-opt model.mlir -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu}'
      polyarch-opt --split-input-file cases.mlir     # verify each case
    """
    from ..passes import parse_pipeline

    text = sys.stdin.read() if input == "-" else open(input).read()
    try:
        passes = parse_pipeline(pipeline)
    except PolyarchError as e:
        raise click.ClickException(str(e))
    chunks = text.split("\n" + SPLIT + "\n") if split else [text]
    outs, failed = [], False
    for chunk in chunks:
        try:
            outs.append(_run_one(chunk, passes, elide_large, input))
        except PolyarchError as e:
            if not split:
                raise click.ClickException(str(e))
            outs.append(f"error: {e}\n")
            failed = True
    asm = f"{SPLIT}\n".join(outs)
    if output == "-":
        sys.stdout.write(asm)
    else:
        with open(output, "w") as f:
            f.write(asm)
    if failed:
        sys.exit(1)


cli.epilog = "\b\nPasses and their options:\n" + _pass_help()


def main() -> None:
    cli()
