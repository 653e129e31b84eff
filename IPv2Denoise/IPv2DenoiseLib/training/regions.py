"""Region codes of the training sampling maps (shared by the pair and scanner-noise samplers)."""

BODY, LUNGS, BACKGROUND = 0, 1, 2
REGION_NAMES = {BODY: "body", LUNGS: "lungs", BACKGROUND: "background"}
