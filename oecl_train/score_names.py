"""The names and meaning of the paper's three scores, without torch (so `--help` stays fast)."""

SCORES = ("norm", "mean-aug-norm", "mean-sq-norm")
DIRECTION = "higher = normal"
DESCRIPTIONS = {
    "norm": "‖z‖ of the plain view (the exported model's score)",
    "mean-aug-norm": "‖mean of z over the plain view and K SimCLR views‖",
    "mean-sq-norm": "mean of ‖z‖² over the plain view and K SimCLR views",
}
