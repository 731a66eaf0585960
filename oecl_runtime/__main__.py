"""`python -m oecl_runtime score|serve|bench`: the runtime's commands without the training CLI."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="python -m oecl_runtime")
