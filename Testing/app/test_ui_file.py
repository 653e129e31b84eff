"""The module's Designer file: valid XML, every ``self.ui.<name>`` the code uses exists, bindings match,
and every class it names is one Slicer provides.

Slicer is not installed here, so Qt's own loader cannot build the panel (its CTK and MRML widgets
live in Slicer's designer plugins). The file is read as that loader reads it (UI XML 4.0) and its
widget and layout classes are checked against what Slicer ships (Qt, CTK, Slicer's MRML widgets);
each custom widget must be declared with the base and header Slicer's plugin has.
"""

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
    assert bound["refineCheckBox"] == "refine"  # denoise --refine
    assert bound["strengthSliderWidget"] == "strength"  # denoise --strength


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


#: Qt widget and layout classes (QtWidgets, bundled with every Slicer) that a module panel may use.
QT_CLASSES = {
    "QWidget", "QFrame", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton",
    "QComboBox", "QLineEdit", "QPlainTextEdit", "QTextEdit", "QTextBrowser", "QSpinBox",
    "QDoubleSpinBox", "QSlider", "QProgressBar", "QGroupBox", "QTabWidget", "QStackedWidget",
    "QScrollArea", "QSplitter", "QListWidget", "QTreeWidget", "QTableWidget", "QTableView",
    "QDialogButtonBox", "QVBoxLayout", "QHBoxLayout", "QGridLayout", "QFormLayout",
}  # fmt: skip
#: Custom widgets in Slicer's designer plugins, with the base each extends there: CTK
#: (CTK/Libs/Widgets) and Slicer's MRML widgets (Libs/MRML/Widgets, Segmentations/Widgets).
SLICER_WIDGETS = {
    "ctkCollapsibleButton": "QWidget",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "ctkCheckBox": "QCheckBox",
    "ctkComboBox": "QComboBox",
    "ctkPathLineEdit": "QWidget",
    "ctkDirectoryButton": "QWidget",
    "ctkSliderWidget": "QWidget",
    "ctkRangeWidget": "QWidget",
    "ctkDoubleSpinBox": "QWidget",
    "ctkMenuButton": "QPushButton",
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QWidget",
    "qMRMLSegmentSelectorWidget": "qMRMLWidget",
    "qMRMLSubjectHierarchyComboBox": "ctkComboBox",
    "qMRMLTableView": "QTableView",
    "qMRMLWindowLevelWidget": "qMRMLWidget",
}


def _classes() -> dict[str, str]:
    """Object name -> class of every widget and layout in the file."""
    return {
        e.get("name"): e.get("class") for e in ET.parse(UI).getroot().iter() if e.tag in ("widget", "layout")
    }


def test_every_class_is_one_slicer_provides():
    unknown = sorted(set(_classes().values()) - QT_CLASSES - set(SLICER_WIDGETS))
    assert not unknown, f"{UI.name} names classes Slicer does not provide: {unknown}"


def test_custom_widgets_are_declared_as_slicer_declares_them():
    root = ET.parse(UI).getroot()
    used = set(_classes().values()) & set(SLICER_WIDGETS)
    declared = {
        c.findtext("class"): (c.findtext("extends"), c.findtext("header")) for c in root.iter("customwidget")
    }
    assert used <= set(declared), f"used but not declared: {sorted(used - set(declared))}"
    for name, (extends, header) in declared.items():
        assert name in SLICER_WIDGETS, f"custom widget {name} is not one Slicer provides"
        assert extends == SLICER_WIDGETS[name], f"{name} extends {SLICER_WIDGETS[name]}, not {extends}"
        assert header == f"{name}.h", f"{name}: header {header}"


def test_names_are_unique_and_scene_connections_reach_mrml_widgets():
    root = ET.parse(UI).getroot()
    names = [e.get("name") for e in root.iter() if e.tag in ("widget", "layout") and e.get("name")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    classes = _classes()
    for connection in root.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        assert sender in classes and receiver in classes, (sender, receiver)
        if connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)":
            assert classes[receiver].startswith("qMRML"), f"{receiver} ({classes[receiver]}) takes no scene"
            assert connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
            assert classes[sender] == "qMRMLWidget"
