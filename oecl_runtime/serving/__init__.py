"""The scoring server of `oecl serve`: its configuration (`config`); the app, with what every
protocol's requests share (`app`); `/v1/score` (`v1`); the Open Inference Protocol (KServe v2)
over REST (`v2_rest`, its tensors in `v2_codec`) and gRPC (`v2_grpc`), through the app's one
batcher; running it in one process or several (`process`); the rules below the app that every
protocol follows (`common`); and the Triton Python-backend models that run the same
oecl_runtime code inside Triton (`triton_model`)."""
