"""The names and meaning of the scores, without torch (so `--help` stays fast)."""

VIEW_SCORE = "mean-view-norm"  # the served and evaluated name of the K-view score (K > 1)
SCORES = ("norm", "mean-aug-norm", "mean-sq-norm", VIEW_SCORE)
RANDOM_VIEW_SCORES = ("mean-aug-norm", "mean-sq-norm")
DIRECTION = "higher = normal"
DESCRIPTIONS = {
    "norm": "‖z‖ of the plain view (the exported model's score)",
    "mean-aug-norm": "‖mean of z over the plain view and K SimCLR views‖",
    "mean-sq-norm": "mean of ‖z‖² over the plain view and K SimCLR views",
    VIEW_SCORE: "‖mean of z over the plain view and fixed crops‖ (the --views K served score)",
}


def served_score(views: int) -> str:
    """The score an artifact exported with `--views views` serves."""
    return VIEW_SCORE if views > 1 else "norm"
