"""The `q-psa` command: a thin table over library functions.

Each command parses its arguments, calls one library function, and renders the result (a table
for people, `--json` for scripts). Heavy imports happen inside commands so `q-psa --help` is
instant. Every user error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from qpsa.cli import baseline, compare, edits, imatrix, model, noise, quant, report, score, study
from qpsa.errors import QpsaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="q-psa: which layers and weights of a quantized GGUF language model matter.",
)

# in the order `q-psa --help` lists them
COMMANDS = (model.models, model.inspect, model.ppl, model.download, baseline.baseline, baseline.agreement, study.study,
            edits.prune, edits.loop, score.score, compare.compare, noise.noise, quant.requantize, quant.sensitivity,
            quant.plan, quant.predictors, imatrix.imatrix, report.report)
for command in COMMANDS:
    app.command(context_settings=baseline.BASELINE_CONTEXT if command is baseline.baseline else None)(command)

# Options that take several values: `--k 1 2 4` is read as `--k 1 --k 2 --k 4`.
MULTI_VALUE_OPTIONS = ("--k", "--methods", "--sigma", "--types", "--predictors")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    out, current = [], None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        looks_like_value = not arg.startswith("-") or arg[1:2].isdigit() or arg[1:2] == "."
        if current and looks_like_value and out and out[-1] != current:
            out += [current, arg]  # a further value of the same option
            continue
        if current and not looks_like_value:
            current = None
        elif current and out and out[-1] == current:
            pass  # the first value right after the option
        out.append(arg)
    return out



def _cli_exceptions() -> tuple[type, ...]:
    """Usage-error classes of the click that typer uses (typer >= 0.29 vendors its own)."""
    classes = [getattr(typer, "TyperException", None)]
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(c for c in classes if c is not None)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
        result = command.main(args=args, prog_name="q-psa", standalone_mode=False)
    except QpsaError as e:
        print(f"q-psa: error: {e}", file=sys.stderr)
        return 2
    except _cli_exceptions() as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help() if getattr(e, "ctx", None) else "usage: q-psa COMMAND", file=sys.stderr)
            return 2
        if hasattr(e, "format_message"):
            print(f"q-psa: error: {e.format_message()}", file=sys.stderr)
            return 2
        if type(e).__name__ == "Abort":
            print("q-psa: interrupted", file=sys.stderr)
            return 130
        raise
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except KeyboardInterrupt:
        print("q-psa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        from qpsa.cli.options import close_workers

        close_workers()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
