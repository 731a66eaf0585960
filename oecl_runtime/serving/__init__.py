"""Serving protocols beside `/v1/score`: the Open Inference Protocol (KServe v2) over REST
(`v2_rest`, with its tensor encoding in `v2_codec`), and the Triton Python-backend model that
runs the same scorer inside Triton Inference Server (`triton_model`)."""
