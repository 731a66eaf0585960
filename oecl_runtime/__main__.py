"""`python -m oecl_runtime`: the runtime's verbs (`verbs.RUNTIME_VERBS`) without the training
CLI."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="python -m oecl_runtime")
