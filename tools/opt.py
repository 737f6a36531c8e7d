"""polyarch-opt: run polyarch passes on an .mlir file (torch dialect) and print the result."""

import sys

import click

from ..errors import PolyarchError


def _pass_help():
    from ..passes import PASSES

    lines = []
    for p in PASSES.values():
        first = p.doc.strip().splitlines()[0]
        lines.append(f"  {first}")
    return "\n".join(lines)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nPasses:\n" + "PLACEHOLDER",
)
@click.argument("input", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("-p", "--pass-pipeline", "pipeline", required=True,
              help="Passes to run, e.g. 'annotate-costs,assign-devices{devices=cpu,vulkan},outline-segments'.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="-", help="Where to write the module (default stdout).")
@click.option("--elide-large/--no-elide-large", default=True, show_default=True, help="Elide large constants and resources when printing.")
def cli(input, pipeline, output, elide_large):
    """Run polyarch passes on INPUT (a torch-dialect .mlir file, '-' for stdin).

    \b
    Example:
      polyarch-opt model.mlir -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu}'
    """
    from torch_mlir import ir

    from ..dialects.polyarch import make_context
    from ..passes import run_pipeline

    text = sys.stdin.read() if input == "-" else open(input).read()
    ctx = make_context()
    try:
        with ctx, ir.Location.unknown():
            module = ir.Module.parse(text)
            run_pipeline(module, pipeline)
            limit = 16 if elide_large else None
            asm = module.operation.get_asm(large_elements_limit=limit, large_resource_limit=64 if elide_large else None, enable_debug_info=False)
    except PolyarchError as e:
        raise click.ClickException(str(e))
    except ir.MLIRError as e:
        raise click.ClickException(f"invalid MLIR in {input}: {e}")
    if output == "-":
        sys.stdout.write(asm)
    else:
        open(output, "w").write(asm)


cli.epilog = "\b\nPasses:\n" + _pass_help()


def main():
    cli()
