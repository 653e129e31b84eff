"""The Slicer module's support code, split by concern; the only package code (with ``app/web``)
that imports ``slicer``/``vtk``.

- :mod:`.scene`: volume nodes <-> :class:`~IPv2DenoiseLib.core.volume.Volume`, new nodes, studies
- :mod:`.views`: the side-by-side comparison layout, window presets, difference overlay
- :mod:`.roi_metrics`: the before/after ROI table of two nodes and its table node
- :mod:`.dicom`: a node's source DICOM files, the derived-series export with the node's provenance
- :mod:`.job`: the denoising job (the command line's pipeline in a background process)
- :mod:`.process`: the background process and its JSON-lines protocol (no Qt, no slicer)
- :mod:`.dependencies`: installing torch & co. into Slicer

Everything but ``dependencies`` works on a bare ``vtkMRMLScene`` (PyPI ``slicer-core``), which
is how the tests run it.
"""
