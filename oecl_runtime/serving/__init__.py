"""Serving protocols beside `/v1/score` (which stays in `server`): the Open Inference Protocol
(KServe v2) over REST (`v2_rest`, its tensors in `v2_codec`) and gRPC (`v2_grpc`), both through
the server's one batcher; what they share with `server` (`common`); and the Triton
Python-backend models that run the same oecl_runtime code inside Triton (`triton_model`)."""
