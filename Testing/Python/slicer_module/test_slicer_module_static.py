"""Checks of the Slicer module that need no Slicer application: LungGradCAM.py and LungGradCAMSlicer/ against the .ui
file, its parameter node and slicer-core's slicer.util; the extension's CMake files configured,
built and installed against a stand-in for Slicer's SDK; the icon."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from helpers import REPO

MODULE = REPO / "LungGradCAM" / "LungGradCAM.py"
UI = REPO / "Resources" / "UI" / "LungGradCAM.ui"
ICON = REPO / "Resources" / "Icons" / "LungGradCAM.png"

#: The Slicer module's files: LungGradCAM.py and, beside it, its settings, logic and background run.
MODULE_FILES = [MODULE, *sorted((REPO / "LungGradCAM" / "LungGradCAMSlicer").glob("*.py"))]
SOURCES = {path: path.read_text(encoding="utf-8") for path in MODULE_FILES}
#: All of them as one tree: each check finds a class, constant or use in whichever file has it.
TREE = ast.Module(
    body=[stmt for path, text in SOURCES.items() for stmt in ast.parse(text, filename=str(path)).body],
    type_ignores=[],
)


# --- the .ui file ------------------------------------------------------------------------------
def _ui_widgets() -> Dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _ui_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def _ui_parameter_names() -> Dict[str, ET.Element]:
    found = {}
    for widget in _ui_widgets().values():
        prop = _ui_property(widget, "SlicerParameterName")
        if prop is not None:
            found[prop.findtext("string")] = widget
    return found


# --- the module source ----------------------------------------------------------------------------
def _class(name: str) -> ast.ClassDef:
    return next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == name)


def _ui_uses() -> Dict[str, Set[str]]:
    """self.ui.<name> -> attributes used on it (``self.ui.x.y`` gives y; bare use gives nothing)."""
    uses: Dict[str, Set[str]] = {}
    parents = {child: node for node in ast.walk(TREE) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(TREE):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            attrs = uses.setdefault(node.attr, set())
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.value is node:
                attrs.add(parent.attr)
    return uses


def _parameter_fields() -> Dict[str, Tuple[str, List[str], ast.AST]]:
    """Parameter node field -> (base type name, annotation names like Choice/WithinRange, default)."""
    fields = {}
    for stmt in _class("LungGradCAMParameterNode").body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        ann = stmt.annotation
        extras: List[str] = []
        if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "Annotated":
            parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            ann = parts[0]
            extras = [p.func.id for p in parts[1:] if isinstance(p, ast.Call) and isinstance(p.func, ast.Name)]
        assert isinstance(ann, ast.Name), f"unexpected annotation for {stmt.target.id}"
        fields[stmt.target.id] = (ann.id, extras, stmt.value)
    return fields


def _module_constant(name: str):
    for stmt in TREE.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
            return ast.literal_eval(stmt.value)
    raise AssertionError(f"{name} is not a literal module constant in {MODULE.name}")


# Qt API that LungGradCAM.py may use per Qt widget class (a subset of Qt 5.15's, whose source is not
# Slicer's: extend it when the module starts using more). Catches e.g. setCurrentNode on a QComboBox.
_QOBJECT = {
    "connect",
    "blockSignals",
    "enabled",
    "visible",
    "toolTip",
    "setToolTip",
    "show",
    "hide",
    "setEnabled",
    "setVisible",
    "styleSheet",
    "objectName",
}
WIDGET_API = {
    "QLabel": _QOBJECT | {"text", "setText", "wordWrap"},
    "QPushButton": _QOBJECT | {"text", "setText", "clicked", "checked", "checkable", "toggled"},
    "QCheckBox": _QOBJECT | {"text", "checked", "setChecked", "toggled", "stateChanged"},
    "QComboBox": _QOBJECT
    | {
        "addItem",
        "clear",
        "count",
        "currentIndex",
        "setCurrentIndex",
        "currentText",
        "currentData",
        "itemData",
        "itemText",
        "findData",
        "findText",
        "currentIndexChanged",
    },
    "QSpinBox": _QOBJECT | {"value", "setValue", "minimum", "maximum", "valueChanged"},
    "QProgressBar": _QOBJECT | {"value", "setValue", "minimum", "maximum", "setRange", "setMaximum"},
}
# CTK's and Slicer's widgets: what PythonQt exposes of them (properties, signals, slots,
# Q_INVOKABLE methods) in the API list taken from Slicer's and CTK's source (test_slicer_api.py).
_API = json.loads((REPO / "Testing" / "SlicerAPI" / "slicer_api.json").read_text())


def _slicer_widget_api(name: str) -> Set[str]:
    members, todo = set(_QOBJECT), [name]
    while todo:
        cls = _API["classes"].get(todo.pop())
        if cls:
            members |= set(cls["methods"]) | set(cls.get("properties", ()))
            todo += cls["bases"]
    return members


WIDGET_API.update(
    {
        name: _slicer_widget_api(name)
        for name in ("ctkSliderWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox", "qMRMLTableView")
    }
)
WIDGET_API["qMRMLTableView"] |= {"currentIndex", "selectionModel"}  # from Qt's QTableView, its base

# parameterNodeWrapper's GUI connectors: parameter type -> widget classes it can bind to.
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},  # QComboBox only with a Choice annotation
}


def test_module_compiles():
    assert len(MODULE_FILES) == 4  # LungGradCAM.py, LungGradCAMSlicer's __init__, background and logic
    for path, text in SOURCES.items():
        compile(text, str(path), "exec")


def test_module_has_the_template_classes():
    bases = {n.name: [ast.unparse(b) for b in n.bases] for n in TREE.body if isinstance(n, ast.ClassDef)}
    assert bases["LungGradCAM"] == ["ScriptedLoadableModule"]
    assert bases["LungGradCAMWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["LungGradCAMLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["LungGradCAMTest"] == ["ScriptedLoadableModuleTest"]
    decorators = [ast.unparse(d) for d in _class("LungGradCAMParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    process = next(n for n in _class("LungGradCAMLogic").body if isinstance(n, ast.FunctionDef) and n.name == "process")
    names = [a.arg for a in process.args.args]
    assert names == [
        "self",
        "inputVolume",
        "camVolume",
        "segmentation",
        "table",
        "options",
        "progressCallback",
        "showResult",
        "estimateCallback",
    ]
    assert process.args.kwarg.arg == "optionKeywords"  # ExplainOptions' fields, from the Python console
    assert {"listCTSeries", "loadSeries", "optionsFromParameterNode", "progressText", "resultText"} <= {
        n.name for n in _class("LungGradCAMLogic").body if isinstance(n, ast.FunctionDef)
    }


def _members(cls: str) -> Set[str]:
    """Methods and properties of a class of the module, and the attributes its methods set on self."""
    node = _class(cls)
    names = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and ast.unparse(n.value) == "self":
            names.add(n.attr)
    return names


def _used_on(cls: str, receivers: Set[str]) -> Set[str]:
    """Attributes the methods of ``cls`` use on one of ``receivers`` (source text, e.g. ``self.logic``
    or a local ``job``)."""
    return {
        n.attr
        for n in ast.walk(_class(cls))
        if isinstance(n, ast.Attribute) and ast.unparse(n.value) in receivers and not n.attr.startswith("__")
    }


def test_what_the_panel_calls_on_the_logic_and_the_background_run_exists():
    """The widget (LungGradCAM.py, which only Qt can run) against the logic and the background run
    it drives (LungGradCAMSlicer/): a method renamed or removed there fails here, not in Slicer."""
    logic = _members("LungGradCAMLogic") | {"getParameterNode"}  # the last from ScriptedLoadableModuleLogic
    used = _used_on("LungGradCAMWidget", {"self.logic"})
    assert {"startProcess", "optionsFromParameterNode", "resultText", "setupPythonRequirements"} <= used
    assert not used - logic, f"the panel calls {sorted(used - logic)} on LungGradCAMLogic, which has none"
    used = _used_on("LungGradCAMWidget", {"self._job", "job"})
    assert {"poll", "running", "result", "cancel", "estimate", "cancelled"} <= used
    missing = used - _members("BackgroundRun")
    assert not missing, f"the panel uses {sorted(missing)} on BackgroundRun, which has none"


def test_every_ui_widget_used_exists_with_a_fitting_class():
    widgets = _ui_widgets()
    uses = _ui_uses()
    assert uses, "the module uses no self.ui widgets?"
    for name, attrs in sorted(uses.items()):
        assert name in widgets, f"self.ui.{name} is used in LungGradCAM.py but not defined in {UI.name}"
        cls = widgets[name].get("class")
        assert cls in WIDGET_API, f"self.ui.{name} is a {cls}; add its API to WIDGET_API"
        wrong = attrs - WIDGET_API[cls]
        assert not wrong, f"self.ui.{name} is a {cls} but LungGradCAM.py uses {sorted(wrong)} on it"


def test_every_slicer_parameter_name_is_a_parameter_node_field_of_a_fitting_type():
    fields = _parameter_fields()
    bound = _ui_parameter_names()
    assert bound, "no widget of the .ui is bound to the parameter node"
    for name, widget in bound.items():
        assert name in fields, f"{UI.name}: SlicerParameterName {name!r} is not a field of LungGradCAMParameterNode"
        type_name, extras, _ = fields[name]
        cls = widget.get("class")
        if type_name.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", f"{name}: a {type_name} needs a qMRMLNodeComboBox, not a {cls}"
            node_types = [s.text for s in _ui_property(widget, "nodeTypes").iter("string")]
            assert node_types == [type_name], f"{name}: selector lists {node_types}, the field is a {type_name}"
        elif cls == "QComboBox":
            assert "Choice" in extras, f"{name}: a QComboBox binds to {type_name} only with a Choice annotation"
        else:
            assert cls in CONNECTABLE[type_name], f"{name}: a {type_name} cannot bind to a {cls}"
        if cls == "ctkSliderWidget":
            assert "WithinRange" in extras, f"{name}: a ctkSliderWidget needs a bounded (WithinRange) float"


def test_every_mrml_widget_gets_the_scene():
    root = ET.parse(UI).getroot()
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {
        n
        for n, w in _ui_widgets().items()
        if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"
    }
    assert mrml_widgets <= connected, f"no scene connection for {sorted(mrml_widgets - connected)}"


#: Imports LungGradCAM.py as Slicer does, on slicer-core and the application stand-ins, in a Python
#: where torch cannot be imported (the panel loads before Slicer has installed torch), and prints
#: what the panel offers: the method field's annotation and default, and the module's categories
#: with the translation context of each.
PANEL = """
import json, sys, typing
sys.modules["torch"] = None
import slicer
from slicer_app_standin import slicer_application
slicer.mrmlScene = slicer.vtkMRMLScene()
with slicer_application(slicer.mrmlScene):
    import LungGradCAM
    method = LungGradCAM.LungGradCAMParameterNode.__annotations__["method"]
    node = LungGradCAM.LungGradCAMParameterNode(None)
    parent = type("Parent", (), {})()
    LungGradCAM.translate = lambda context, text: context + "|" + text
    LungGradCAM.LungGradCAM(parent)
print(json.dumps({"method": [list(a) for a in typing.get_args(method)[1:]], "default": node.method,
                  "categories": parent.categories}))
"""


@pytest.fixture(scope="module")
def panel():
    """What the panel offers, read from LungGradCAM.py imported without torch (see PANEL)."""
    pytest.importorskip("slicer")
    result = subprocess.run(
        [sys.executable, "-c", PANEL],
        cwd=REPO / "Testing" / "Python",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "Testing" / "Python")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_choice_defaults_are_choices_and_methods_match_the_engine(panel):
    """The panel's methods are the engine's (LungGradCAMLib.engine.cam.METHODS) after "auto", which
    is the default (the model card's own method), and they come without torch: the panel loads
    before Slicer has installed it."""
    from LungGradCAMLib.engine.cam import METHODS

    assert panel["method"] == [["Choice", ["auto", *METHODS]]]
    assert panel["default"] == "auto", "the panel's default method is the model card's own (auto)"


def test_every_slicer_util_function_called_exists_in_slicer_core():
    util = pytest.importorskip("slicer.util", reason="slicer-core is not installed")
    called = {
        node.attr
        for node in ast.walk(TREE)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "util"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "slicer"
    }
    assert {"loadUI", "childWidgetVariables", "tryWithErrorDisplay"} <= called
    missing = sorted(name for name in called if not callable(getattr(util, name, None)))
    assert not missing, f"slicer.util has no {missing}"


def test_resources_the_module_loads_exist():
    paths = [
        node.args[0].value
        for node in ast.walk(TREE)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "resourcePath"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    assert "UI/LungGradCAM.ui" in paths and "Icons/LungGradCAM.png" in paths
    for relative in paths:
        assert (REPO / "Resources" / relative).is_file(), f"Resources/{relative} is loaded by the module but missing"


def test_icon_is_a_128_pixel_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


# --- CMake -------------------------------------------------------------------------------------------
def test_cmake_lists_name_the_module_and_existing_files():
    top = (REPO / "CMakeLists.txt").read_text()
    for needed in (
        "project(LungGradCAM)",
        'set(EXTENSION_DEPENDS "PyTorch")',
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(LungGradCAM)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needed in top, f"top-level CMakeLists.txt lacks {needed}"
    for var in ("CATEGORY", "CONTRIBUTORS", "DESCRIPTION"):
        assert f"set(EXTENSION_{var} " in top
    module = (REPO / "LungGradCAM" / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module


def _cmake_settings() -> Dict[str, str]:
    top = (REPO / "CMakeLists.txt").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r'^set\((EXTENSION_\w+) "?([^")]*)"?\)', top, re.M)}


def test_extension_metadata_has_no_placeholders():
    """No homepage, icon or screenshot URL that leads nowhere: the extension has no public home
    yet, so they are left out (Slicer's description spec makes them optional); what is set is real."""
    settings = _cmake_settings()
    assert not {"EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"} & set(settings)
    text = (REPO / "CMakeLists.txt").read_text().lower()
    assert not re.search(r"example\.(com|org)|todo|fixme|your[-_ ]?name|<[a-z ]+>", text)
    assert settings["EXTENSION_CATEGORY"] == "Quantification"
    assert "Research use only" in settings["EXTENSION_DESCRIPTION"] and "\n" not in settings["EXTENSION_DESCRIPTION"]
    assert "LungGradCAM.py" in (REPO / "LungGradCAM" / "CMakeLists.txt").read_text()
    assert settings["EXTENSION_README_FILE"] == "${CMAKE_CURRENT_SOURCE_DIR}/README.md"


def test_the_modules_category_is_the_extensions_translated_as_slicer_translates_categories(panel):
    """Slicer translates module categories in the context qSlicerAbstractCoreModule."""
    assert panel["categories"] == ["qSlicerAbstractCoreModule|" + _cmake_settings()["EXTENSION_CATEGORY"]]


def test_what_slicers_extensions_index_checks_that_can_be_checked_here():
    """The checks of Slicer's ExtensionsIndex (scripts/check_description_files.py) that need no
    public repository: a license file in the root matching the package's declared license, the
    CMake project named as the extension, contributors as "Name (Organisation)", and help text
    with a documentation link. (Its URL checks need a public home: see the README.)"""
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    metadata = importlib.metadata.metadata("LungGradCAMLib")  # the package as installed
    assert metadata["License-Expression"] == "Apache-2.0" and "LICENSE" in metadata.get_all("License-File")
    assert re.search(r"^project\(LungGradCAM\)", (REPO / "CMakeLists.txt").read_text(), re.M)
    quoted = re.search(r'^set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text(), re.M)
    contributors = [c.strip() for c in quoted.group(1).split(",")]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors), contributors
    module = _class("LungGradCAM")
    text = ast.unparse(module)
    assert "contributors = ['LungGradCAM developers (LungGradCAM project)']" in text
    assert "documentationUrl()" in text and "<a href=" in text


def test_extensions_index_entry_follows_slicers_catalog_schema():
    """ExtensionsIndex/LungGradCAM.json, the file to submit to Slicer's ExtensionsIndex, against the
    catalog entry schema of the pinned Slicer (required and allowed keys, types, enumerations)."""
    entry = json.loads((REPO / "ExtensionsIndex" / "LungGradCAM.json").read_text())
    schema = _API["extension_catalog_entry_schema"]
    assert entry["$schema"] == schema["id"]
    assert set(schema["required"]) <= set(entry), f"missing {set(schema['required']) - set(entry)}"
    assert schema["additionalProperties"] is False and set(entry) <= set(schema["properties"])
    python_type = {"string": str, "array": list, "boolean": bool, "integer": int}
    for key, value in entry.items():
        rule = schema["properties"][key]
        assert isinstance(value, python_type[rule["type"]]), key
        assert value in rule.get("enum", [value]), key
        assert rule.get("minimum", value) <= value <= rule.get("maximum", value) if rule["type"] == "integer" else True
    settings = _cmake_settings()
    assert entry["category"] == settings["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == settings["EXTENSION_DEPENDS"].split()
    # a local entry builds this checkout (scm_url relative to Slicer_LOCAL_EXTENSIONS_DIR = ExtensionsIndex/)
    assert entry["scm_type"] == "local" and (REPO / "ExtensionsIndex" / entry["scm_url"] / "CMakeLists.txt").is_file()


# A stand-in for the parts of Slicer's SDK an extension's CMakeLists.txt uses (no Slicer build
# exists here): the same variables, and macros that check and copy/install what they are given as
# Slicer's do, logging the calls. It lets CMake configure, build and install the extension.
_STANDIN = {
    "SlicerConfig.cmake": """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/ExtensionGenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/ExtensionCPack.cmake)
""",
    "UseSlicer.cmake": """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING ON)
set(_standin_log ${CMAKE_BINARY_DIR}/slicer-standin.log)
file(WRITE ${_standin_log} "")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(_f ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${_f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_f}'")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${_f} ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${_f} COPYONLY)
    get_filename_component(_d ${_f} DIRECTORY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${_f} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_d})
  endforeach()
  file(APPEND ${_standin_log} "scripted-module ${MY_SLICER_NAME} generic-tests=${MY_SLICER_WITH_GENERIC_TESTS}\\n")
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "slicer_add_python_unittest given nonexistent script '${MY_SCRIPT}'")
  endif()
  file(APPEND ${_standin_log} "python-unittest ${MY_SCRIPT}\\n")
endfunction()
""",
    "ExtensionGenerateConfig.cmake": """
foreach(_v EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_DEPENDS EXTENSION_README_FILE)
  if("${${_v}}" STREQUAL "")
    message(FATAL_ERROR "${_v} is not set")
  endif()
endforeach()
file(APPEND ${_standin_log} "extension ${PROJECT_NAME} depends=${EXTENSION_DEPENDS}\\n")
""",
    "ExtensionCPack.cmake": 'file(APPEND ${_standin_log} "cpack ${PROJECT_NAME}\\n")\n',
}


@pytest.fixture(scope="module")
def cmake_install(tmp_path_factory):
    """Configure, build and install the extension against the stand-in; yields (build, install) dirs."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    standin = root / "Slicer"
    standin.mkdir()
    for name, text in _STANDIN.items():
        (standin / name).write_text(text)
    build, install = root / "build", root / "install"

    def run(*args: str) -> None:
        done = subprocess.run([cmake, *args], capture_output=True, text=True)
        assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    run("-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={standin}")
    run("--build", str(build))
    run("--install", str(build), "--prefix", str(install))
    return build, install


EXPECTED_FILES = [
    "LungGradCAM.py",
    "LungGradCAMSlicer/__init__.py",
    "LungGradCAMSlicer/background.py",
    "LungGradCAMSlicer/logic.py",
    "LungGradCAMLib/__init__.py",
    "LungGradCAMLib/mrml.py",
    "LungGradCAMLib/engine/models/__init__.py",
    "Resources/UI/LungGradCAM.ui",
    "Resources/Icons/LungGradCAM.png",
    "README.md",
    "LICENSE",
]


def test_cmake_registers_the_module_and_its_self_test(cmake_install):
    build, _ = cmake_install
    log = (build / "slicer-standin.log").read_text().splitlines()
    assert "scripted-module LungGradCAM generic-tests=TRUE" in log
    assert "python-unittest LungGradCAM.py" in log
    assert "extension LungGradCAM depends=PyTorch" in log and "cpack LungGradCAM" in log


@pytest.mark.parametrize("tree", ["build", "install"])
def test_cmake_puts_the_engine_and_resources_beside_the_module(cmake_install, tree):
    base = cmake_install[0 if tree == "build" else 1] / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for relative in EXPECTED_FILES:
        assert (base / relative).is_file(), f"{tree} tree lacks qt-scripted-modules/{relative}"
    # every engine module and bundled model file is there, byte for byte
    sources = sorted((REPO / "LungGradCAMLib").rglob("*.py")) + sorted((REPO / "Resources" / "Models").glob("*.*"))
    for source in sources:
        copy = base / source.relative_to(REPO)
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}"
    assert not list(base.rglob("__pycache__")) and not (base / "Resources" / "Icons" / "make_icon.py").exists()


def test_installed_engine_finds_its_bundled_models(cmake_install):
    """The engine, imported from the installed tree as Slicer would, reads Resources/Models there."""
    base = cmake_install[1] / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    code = "import LungGradCAMLib, LungGradCAMLib.engine.models as m; print(LungGradCAMLib.__file__); print(m.models_dir())"
    env = {k: v for k, v in os.environ.items() if k != "LUNGGRADCAM_MODELS"}
    env.update(PYTHONPATH=str(base), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=base, env=env)
    assert done.returncode == 0, done.stderr
    package, models = done.stdout.split()
    assert Path(package).parent == base / "LungGradCAMLib"
    assert Path(models) == base / "Resources" / "Models"


def _method(cls: str, name: str) -> ast.FunctionDef:
    return next(n for n in _class(cls).body if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(node: ast.AST, name: str) -> List[ast.Call]:
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and ast.unparse(c.func).endswith(name)]


def test_the_panel_survives_an_unreadable_dicom_database():
    """setup() lists the DICOM database; slicer.util.tryWithErrorDisplay re-raises after its dialog
    (Slicer 5.8.1's util.py), which would abort the panel: the listing catches the engine's error
    and says it in the panel instead. (Static: no Qt widget runs here.)"""
    refresh = _method("LungGradCAMWidget", "onDicomRefresh")
    assert not _calls(refresh, "tryWithErrorDisplay")
    handlers = [h for t in ast.walk(refresh) if isinstance(t, ast.Try) for h in t.handlers]
    assert any(ast.unparse(h.type) == "LungGradCAMError" for h in handlers)
    assert _calls(_method("LungGradCAMWidget", "setup"), "onDicomRefresh")


def test_no_busy_cursor_under_the_install_questions():
    """Apply asks before installing (setupPythonRequirements): that call is not under a wait
    cursor; the cursor is busy only around pip_install itself. (Static.)"""
    apply = _method("LungGradCAMWidget", "onApplyButton")
    for with_node in (n for n in ast.walk(apply) if isinstance(n, ast.With)):
        if _calls(with_node, "setupPythonRequirements"):
            call = with_node.items[0].context_expr
            assert not any(k.arg == "waitCursor" and ast.unparse(k.value) == "True" for k in call.keywords)
    setup = _method("LungGradCAMLogic", "setupPythonRequirements")
    (install,) = _calls(setup, "pip_install")
    cursor = _calls(setup, "setOverrideCursor")
    assert cursor and cursor[0].lineno > _calls(setup, "confirmOkCancelDisplay")[0].lineno
    assert cursor[0].lineno < install.lineno < _calls(setup, "restoreOverrideCursor")[0].lineno


def test_apply_runs_in_a_background_process_and_the_database_list_follows_changes():
    """The widget starts the run with startProcess and polls it from a timer; Cancel cancels the
    child; the DICOM list is refreshed on the database's signals. (Static; the run itself is
    tested on slicer-core with a real child process in test_slicer_logic.py.)"""
    assert _calls(_method("LungGradCAMWidget", "_start"), "startProcess")
    assert _calls(_method("LungGradCAMWidget", "_start"), "QTimer")
    assert not _calls(_method("LungGradCAMWidget", "onApplyButton"), ".process")
    assert _calls(_method("LungGradCAMWidget", "onApplyButton"), "cancel")
    connects = _calls(_method("LungGradCAMWidget", "setup"), "connect")
    assert any("_scheduleDicomRefresh" in ast.unparse(c) for c in connects)
    signals = {
        s.value
        for c in ast.walk(_method("LungGradCAMWidget", "setup"))
        if isinstance(c, ast.Tuple)
        for s in c.elts
        if isinstance(s, ast.Constant) and str(s.value).endswith(")")
    }
    assert {"databaseChanged()", "seriesAdded(QString)"} <= signals
