"""Batch denoising of whole archives: case discovery, done records, the local and Ray engines.

``cases`` finds the studies (a folder tree or a CSV manifest) and shards them; ``records`` keeps the
per-case done records and the summaries; ``pipeline`` processes cases (read, denoise, write) and
runs them on one machine with I/O overlapped; ``ray_engine`` runs the same steps on Ray actors
(imported only for ``--engine ray``; nothing else imports ray).
"""
