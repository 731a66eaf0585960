"""The runtime's click commands, one module per verb (`score`, `serve`, `bench`, `verify`,
`engine`, `triton_repo`) and the options they share (`common`).

`verbs.RUNTIME_VERBS` names them, and a verb's module is imported only when that verb runs: at
the top of each, click and the standard library alone, so that `--help` loads no numpy,
onnxruntime or torch; everything heavier is imported inside the command's body."""
