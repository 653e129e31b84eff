"""The module's Designer file: valid XML, every ``self.ui.<name>`` the code uses exists, bindings match."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "Resources" / "UI" / "IPv2Denoise.ui"
MODULE = ROOT / "IPv2Denoise" / "IPv2Denoise.py"


def _widgets():
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


def _referenced_names():
    return set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE.read_text(encoding="utf-8")))


def _parameter_fields():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IPv2DenoiseParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_ui_parses_and_root_is_mrml_widget():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("class").text == "IPv2Denoise"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_every_referenced_widget_exists():
    names = _referenced_names()
    assert len(names) > 15  # the code really uses the .ui
    missing = sorted(names - set(_widgets()))
    assert not missing, f"widgets used in IPv2Denoise.py but absent from the .ui: {missing}"


def test_parameter_bindings_name_real_fields():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= fields, (bound, fields)
    assert bound["inputSelector"] == "inputVolume" and bound["outputSelector"] == "outputVolume"
    assert bound["removeBackgroundCheckBox"] == "removeBackground"
    assert bound["adaptCheckBox"] == "adapt"  # scan-adaptive fine-tuning (denoise --adapt)
    assert bound["bestQualityCheckBox"] == "bestQuality"  # denoise --ensemble 8


def test_input_selector_hides_labelmaps_and_scene_is_connected():
    widgets = _widgets()
    inp = widgets["inputSelector"]
    hidden = [
        s.text
        for p in inp.findall("property")
        if p.get("name") == "hideChildNodeTypes"
        for s in p.iter("string")
    ]
    assert hidden == ["vtkMRMLLabelMapVolumeNode"]
    receivers = {c.find("receiver").text for c in ET.parse(UI).getroot().iter("connection")}
    assert {"inputSelector", "outputSelector", "roiSelector"} <= receivers


def test_device_choices_are_the_one_vocabulary():
    """The module's device combo offers only names of core.device (what the background job accepts)."""
    from IPv2DenoiseLib.core.device import DEVICE_CHOICES

    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "DEVICES" for t in n.targets)
    )
    values = [value for _, value in ast.literal_eval(node.value)]
    assert values and set(values) <= set(DEVICE_CHOICES), values
