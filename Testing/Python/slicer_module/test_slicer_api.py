"""Every Slicer, CTK, Qt and VTK name that the Slicer module (LungGradCAM/LungGradCAM.py and
LungGradCAM/LungGradCAMSlicer/) and LungGradCAMLib/mrml.py use, checked against the API taken from Slicer's source at a pinned version
(Testing/SlicerAPI/slicer_api.json; regenerate with the command it records), so that a misspelt,
wrong-argument or removed API fails here rather than in a user's Slicer.

What is checked, statically (ast):

* ``from slicer... import`` names, ``slicer.util.f(...)`` and the other Python APIs of Slicer:
  the name exists, positional and keyword arguments bind to its signature;
* ``slicer.<Class>``, ``slicer.mrmlScene.M(...)``, ``slicer.app.M(...)``,
  ``slicer.modules.<m>.logic().M(...)`` and names assigned from them: the class and the method or
  property exist (with the base classes), VTK methods get an argument count one overload takes and
  no keyword arguments;
* any other call of a VTK-style method (``x.GetImageData()``): some listed class, or a VTK class
  the files name, has a method of that name taking that many arguments;
* ``qt.*`` names against :data:`QT_API` (Qt is not part of Slicer's source: the Qt 5.15 API of
  the classes used, written out here);
* the stand-ins of slicer_app_standin.py have only names Slicer has.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import pytest

from helpers import REPO

API = json.loads((REPO / "Testing" / "SlicerAPI" / "slicer_api.json").read_text())
FILES = [
    REPO / "LungGradCAM" / "LungGradCAM.py",
    *sorted((REPO / "LungGradCAM" / "LungGradCAMSlicer").glob("*.py")),
    REPO / "LungGradCAMLib" / "mrml.py",
]

#: Qt 5.15's API of the Qt classes the module reaches through ``qt.`` or ``slicer.app`` (static
#: functions and methods PythonQt wraps). Not from Slicer's source: Qt's own documentation.
QT_API = {
    "QIcon": {"__init__", "isNull", "pixmap", "addFile"},
    "QFileDialog": {"getOpenFileName", "getSaveFileName", "getExistingDirectory"},
    "QCoreApplication": {"processEvents", "instance", "applicationName", "translate"},
    "QGuiApplication": {"setOverrideCursor", "restoreOverrideCursor"},
    "QTimer": {"__init__", "singleShot", "setInterval", "start", "stop", "isActive"},
    "Qt": {"WaitCursor", "ArrowCursor"},
    # what PythonQt gives every QObject: connect(signal, slot) and disconnect
    "QObject": {"connect", "disconnect"},
}
#: ``slicer.modules.<name>.logic()`` -> the logic class it returns.
MODULE_LOGICS = {
    "volumerendering": "vtkSlicerVolumeRenderingLogic",
    "markups": "vtkSlicerMarkupsLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
    "colors": "vtkSlicerColorLogic",
}
#: Python modules of Slicer the files may import from.
PYTHON_MODULES = {
    "slicer.util",
    "slicer.ScriptedLoadableModule",
    "slicer.parameterNodeWrapper",
    "slicer.i18n",
    "DICOMLib.DICOMUtils",
}


def _class_chain(name: str) -> List[dict]:
    chain, todo = [], [name]
    while todo:
        current = API["classes"].get(todo.pop())
        if current is not None:
            chain.append(current)
            todo += current["bases"]
    return chain


def _members(name: str) -> Dict[str, List[List[int]]]:
    """Method name -> argument-count ranges of class ``name`` and its listed bases; Qt classes'
    properties and signals with None (attributes)."""
    out: Dict[str, List[List[int]]] = {}
    for cls in _class_chain(name):
        for method, arities in cls["methods"].items():
            out.setdefault(method, []).extend(arities)
        for prop in cls.get("properties", []):
            out.setdefault(prop, [])
    if name in ("qSlicerApplication", "qSlicerCoreApplication"):
        out.update({m: [] for m in QT_API["QCoreApplication"] | QT_API["QGuiApplication"]})
    if any("signals" in cls for cls in _class_chain(name)):  # a Qt class of Slicer or CTK
        out.update({m: [] for m in QT_API["QObject"]})
    return out


def _signals(name: str) -> Set[str]:
    return {s for cls in _class_chain(name) for s in cls.get("signals", [])}


def _vtk_arities(cls: type, method: str) -> List[List[int]]:
    """Argument counts of a VTK method from its wrapped signatures (``Name(self, a, b) -> T``)."""
    ranges = []
    for line in (getattr(getattr(cls, method, None), "__doc__", None) or "").splitlines():
        line = line.strip()
        if line.startswith(f"{method}(self"):
            depth, end = 0, len(line)
            for i, c in enumerate(line[len(method) :], len(method)):
                depth += {"(": 1, ")": -1}.get(c, 0)
                if depth == 0:
                    end = i
                    break
            params = [p for p in line[len(method) + 1 : end].split(",")[1:] if p.strip()]
            required = [p for p in params if "=" not in p]  # "priority: float = 0.0" may be left out
            ranges.append([len(required), len(params)])
    return ranges


@dataclass
class Checker(ast.NodeVisitor):
    """Walks one file and collects what does not match the API."""

    path: str
    vtk_classes: Set[str] = field(default_factory=set)
    problems: List[str] = field(default_factory=list)
    types: Dict[str, str] = field(default_factory=dict)  # variable -> class, per function
    modules: Set[str] = field(default_factory=set)  # names bound by import statements

    def problem(self, node: ast.AST, text: str) -> None:
        self.problems.append(f"{self.path}:{getattr(node, 'lineno', '?')}: {text}")

    # --- what an expression is -------------------------------------------------------------------
    def class_of(self, node: ast.AST) -> Optional[str]:
        """The Slicer/CTK class an expression evaluates to, where it can be told statically."""
        text = ast.unparse(node)
        if text == "slicer.mrmlScene":
            return "vtkMRMLScene"
        if text == "slicer.app":
            return "qSlicerApplication"
        if isinstance(node, ast.Name):
            return self.types.get(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if (
                func.attr == "logic"
                and isinstance(func.value, ast.Attribute)
                and ast.unparse(func.value.value) == "slicer.modules"
            ):
                return MODULE_LOGICS.get(func.value.attr)
            if ast.unparse(func) == "slicer.app.dicomDatabase":
                return "ctkDICOMDatabase"
            if (
                isinstance(func.value, ast.Attribute)
                and ast.unparse(func.value.value) == "slicer"
                and func.value.attr in API["classes"]
                and func.attr == "New"
            ):
                return func.value.attr
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and ast.unparse(node.func.value) == "slicer"
            and node.func.attr in API["classes"]
        ):
            return node.func.attr  # slicer.vtkMRMLScene()
        return None

    # --- visits -------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        saved, self.types = self.types, {}
        self.generic_visit(node)
        self.types = saved

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        cls = self.class_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if cls:
                    self.types[target.id] = cls
                else:
                    self.types.pop(target.id, None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module == "slicer":
            for alias in node.names:
                if alias.name not in API["classes"] and not alias.name.startswith("vtkMRML"):
                    self.problem(node, f"slicer.{alias.name} is not a class of Slicer's API list")
                elif alias.name not in API["classes"]:
                    self.problem(
                        node,
                        f"slicer.{alias.name} is not in the API list: add it to CLASSES in "
                        "Testing/SlicerAPI/extract_slicer_api.py and regenerate",
                    )
        elif module in PYTHON_MODULES:
            api = API["python"][module]
            known = set(api["functions"]) | set(api["classes"]) | set(api["names"])
            for alias in node.names:
                if alias.name not in known:
                    self.problem(node, f"{module} has no {alias.name!r} in Slicer {API['slicer']['revision']}")
        elif module.split(".")[0] in ("slicer", "DICOMLib"):
            self.problem(node, f"{module} is not in the API list (PYTHON_MODULES of extract_slicer_api.py)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        base = ast.unparse(node.value)
        if base == "slicer" and node.attr.startswith("vtk") and node.attr not in API["classes"]:
            self.problem(node, f"slicer.{node.attr} is not a class in the API list")
        if base == "qt":
            if node.attr not in QT_API:
                self.problem(node, f"qt.{node.attr} is not in QT_API")
        elif isinstance(node.value, ast.Attribute) and ast.unparse(node.value.value) == "qt":
            if node.attr not in QT_API.get(node.value.attr, set()):
                self.problem(node, f"qt.{node.value.attr} has no {node.attr!r}")
        if base == "vtk":
            import vtk

            if not hasattr(vtk, node.attr):
                self.problem(node, f"vtk.{node.attr} does not exist")
            elif node.attr.startswith("vtk"):
                self.vtk_classes.add(node.attr)
        cls = self.class_of(node.value)
        if cls is not None and not isinstance(getattr(node, "_parent_call", None), ast.Call):
            members = _members(cls)
            if node.attr not in members and not (node.attr.endswith("Event") and cls == "vtkMRMLScene"):
                self.problem(node, f"{cls} has no {node.attr!r} in Slicer's API list")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            func._parent_call = node  # type: ignore[attr-defined]
            target = ast.unparse(func.value)
            if target in {m.replace("DICOMLib.", "") for m in PYTHON_MODULES}:
                module = next(m for m in PYTHON_MODULES if m.endswith(target))
                self.check_python_call(node, module, func.attr)
            else:
                cls = self.class_of(func.value)
                if cls is None and target.startswith("slicer.") and target.split(".")[1] in API["classes"]:
                    cls = target.split(".")[1]  # a static method: slicer.vtkSlicer...Logic.Method(...)
                if cls is not None:
                    self.check_cpp_call(node, cls, func.attr)
                elif func.attr[:1].isupper() and target.split(".")[0] not in self.modules | {"self"}:
                    self.check_any_vtk_call(node, func.attr)
        self.generic_visit(node)

    # --- call checks ----------------------------------------------------------------------------------
    def check_python_call(self, node: ast.Call, module: str, name: str) -> None:
        api = API["python"][module]
        if name in api["classes"]:
            return
        params = api["functions"].get(name)
        if params is None:
            self.problem(node, f"{module}.{name} does not exist in Slicer {API['slicer']['revision']}")
            return
        positional = [p for p in params if p[1] in ("posonly", "pos")]
        keywords = {p[0] for p in params if p[1] in ("pos", "kwonly")}
        if len(node.args) > len(positional) and not any(p[1] == "varargs" for p in params):
            self.problem(node, f"{module}.{name} takes at most {len(positional)} positional arguments")
        for keyword in node.keywords:
            if keyword.arg is not None and keyword.arg not in keywords and not any(p[1] == "varkw" for p in params):
                self.problem(node, f"{module}.{name} has no parameter {keyword.arg!r}")
        given = {k.arg for k in node.keywords} | {p[0] for p in positional[: len(node.args)]}
        missing = [p[0] for p in params if p[1] in ("pos", "posonly", "kwonly") and not p[2] and p[0] not in given]
        if missing and not any(isinstance(a, ast.Starred) for a in node.args):
            self.problem(node, f"{module}.{name} needs {missing}")

    def check_cpp_call(self, node: ast.Call, cls: str, name: str) -> None:
        members = _members(cls)
        if name not in members:
            self.problem(node, f"{cls} has no method {name!r} in Slicer's API list")
            return
        if name in QT_API["QObject"] and node.args and isinstance(node.args[0], ast.Constant):
            signal = str(node.args[0].value).split("(")[0]
            if signal not in _signals(cls):
                self.problem(node, f"{cls} has no signal {signal!r} in Slicer's API list")
        self.check_arity(node, f"{cls}.{name}", members[name])

    def check_arity(self, node: ast.Call, what: str, arities: List[List[int]]) -> None:
        if not arities:
            return  # a Qt property or a method whose argument counts are not known
        if node.keywords:
            self.problem(node, f"{what} is a C++ method: it takes no keyword arguments")
        if any(isinstance(a, ast.Starred) for a in node.args):
            return  # *args: the count is not known statically
        n = len(node.args)
        if not any(low <= n <= high for low, high in arities):
            self.problem(node, f"{what} takes {' or '.join(f'{a}-{b}' for a, b in arities)} arguments, not {n}")

    def check_any_vtk_call(self, node: ast.Call, name: str) -> None:
        import vtk

        arities = [a for cls in API["classes"] for a in _members(cls).get(name, [])]
        known = any(name in _members(cls) for cls in API["classes"])
        for cls in sorted(self.vtk_classes | VTK_RETURNED):
            if hasattr(getattr(vtk, cls), name):
                known = True
                arities += _vtk_arities(getattr(vtk, cls), name)
        if not known:
            self.problem(node, f"no class of Slicer's API list (or VTK class used here) has a method {name!r}")
        else:
            self.check_arity(node, name, arities)


#: VTK classes that MRML getters return to the files (their methods are called on them).
VTK_RETURNED = {
    "vtkImageData",
    "vtkPointData",
    "vtkDataArray",
    "vtkVolumeProperty",
    "vtkPiecewiseFunction",
    "vtkColorTransferFunction",
    "vtkTable",
    "vtkMatrix4x4",
    "vtkAbstractArray",
}


def check(source: str, path: str = "<source>") -> List[str]:
    checker = Checker(path)
    tree = ast.parse(source)
    for node in ast.walk(tree):  # the vtk classes named anywhere count for every call
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "vtk" and node.attr.startswith("vtk"):
            checker.vtk_classes.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):  # calls on modules are not C++ methods
            checker.modules.update((a.asname or a.name).split(".")[0] for a in node.names)
    checker.visit(tree)
    return checker.problems


def test_api_list_is_from_the_pinned_slicer_source():
    assert API["slicer"]["revision"] == "v5.8.1" and len(API["slicer"]["commit"]) == 40
    assert API["ctk"]["pinned_by"] == "SuperBuild/External_CTK.cmake" and len(API["ctk"]["commit"]) == 40
    assert "extract_slicer_api.py" in API["command"]
    assert (REPO / "Testing" / "SlicerAPI" / "extract_slicer_api.py").is_file()
    # a few facts anyone can check in Slicer 5.8.1's source
    assert API["python"]["slicer.util"]["functions"]["setSliceViewerLayers"][3][0] == "foregroundOpacity"
    assert [1, 2] in API["classes"]["vtkMRMLScene"]["methods"]["AddNewNodeByClass"]
    assert "databaseFilename" in API["classes"]["ctkDICOMDatabase"]["properties"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_slicer_name_the_file_uses_is_in_slicer(path):
    pytest.importorskip("vtk")
    problems = check(path.read_text(encoding="utf-8"), path.name)
    assert not problems, "\n".join(problems)


def test_the_check_finds_misspelt_wrong_argument_and_removed_apis():
    pytest.importorskip("vtk")
    bad = """
import slicer, vtk, qt
from slicer.util import VTKObservationMixin, NoSuchMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLNoSuchNode
def f(node):
    slicer.util.setSliceViewerLayer(background=node)
    slicer.util.setSliceViewerLayers(background=node, foregroundOpacty=0.4)
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a", "b", "c")
    slicer.mrmlScene.GetFirstNodeByClas("vtkMRMLScalarVolumeNode")
    logic = slicer.modules.volumerendering.logic()
    logic.GetFirstVolumeRenderingDisplayNode(node, 3)
    node.GetImageDta()
    node.SetIJKToRASMatrix(matrix=None)
    database = slicer.app.dicomDatabase()
    database.databaseFileName
    database.connect("databaseChange()", f)
    qt.QFileDialog.getOpenFileNames()
"""
    problems = "\n".join(check(bad))
    for expected in (
        "NoSuchMixin",
        "vtkMRMLNoSuchNode",
        "setSliceViewerLayer does not exist",
        "foregroundOpacty",
        "AddNewNodeByClass takes",
        "GetFirstNodeByClas",
        "GetFirstVolumeRenderingDisplayNode takes",
        "GetImageDta",
        "no keyword arguments",
        "databaseFileName",
        "getOpenFileNames",
        "no signal 'databaseChange'",
    ):
        assert expected in problems, f"not found: {expected}\n{problems}"


def test_the_stand_ins_have_only_slicers_names():
    from slicer_app_standin import STANDIN_NAMES, ScriptedLoadableModuleLogic

    for module, names in STANDIN_NAMES.items():
        api = API["python"][module]
        known = set(api["functions"]) | set(api["classes"]) | set(api["names"])
        assert set(names) <= known, f"{module}: {set(names) - known}"
    real = API["python"]["slicer.ScriptedLoadableModule"]["classes"]["ScriptedLoadableModuleLogic"]
    assert real["methods"]["getParameterNode"] == [] and "moduleName" in real["attributes"]
    assert {"getParameterNode", "__init__"} >= {
        n for n in vars(ScriptedLoadableModuleLogic) if not n.startswith("__")
    } | {"__init__"}
