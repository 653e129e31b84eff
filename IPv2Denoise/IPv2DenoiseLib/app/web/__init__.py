"""``ipv2-denoise web``: the denoising panel in a browser, on Slicer's own views (trame-slicer).

``data_root.py`` keeps every path inside ``--data-root``; ``jobs.py`` runs one denoise or export at
a time in a background thread over :class:`~IPv2DenoiseLib.app.pipeline.DenoisePipeline` (progress,
ETA, cancel); ``server.py`` is the trame app (MRML scene, linked slice views, the page). Only
``server.py`` imports trame or Slicer; the other two are plain Python, so they are tested without
a browser.
"""
