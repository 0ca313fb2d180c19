"""Stand-ins for what only the 3D Slicer application provides, so that the Slicer module (LungGradCAM/)
imports and its Logic runs on the ``slicer-core`` wheel.

Real (slicer-core): MRML and its scene, ``slicer.util``, the Segmentations, Volume Rendering,
Markups and Colors logics. Stand-ins (the application layer, which needs Qt): the ``qt`` module,
``slicer.app`` (its ``dicomDatabase()`` says only where its ``ctkDICOM.sql`` file is: the file
itself is a real CTK database), ``slicer.modules.<name>.logic()`` (returning the real logic
classes, given the scene, as the application does), and the Python layer the application ships:
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` and ``slicer.i18n``. Each
stand-in has only names that Slicer has (test_slicer_api.py checks them against the API list taken
from Slicer's source) and does the least that lets the module's code run.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import slicer

REPO = Path(__file__).resolve().parents[2]

#: What each stand-in module defines (module name -> attribute names); checked against Slicer's API.
STANDIN_NAMES = {
    "slicer.ScriptedLoadableModule": (
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleTest",
    ),
    "slicer.parameterNodeWrapper": ("parameterNodeWrapper", "Choice", "WithinRange"),
    "slicer.i18n": ("tr", "translate"),
}


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent

    def onReload(self) -> None:  # Slicer's own re-reads the module's file; the tests import it afresh
        self.reloaded = True


class ScriptedLoadableModuleTest:
    pass


class ScriptedLoadableModuleLogic:
    """As Slicer's: ``moduleName`` from the class name; the parameter node is the scene's singleton
    vtkMRMLScriptedModuleNode tagged with the module name (a real MRML node)."""

    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__[:-5] if type(self).__name__.endswith("Logic") else type(self).__name__

    def getParameterNode(self) -> Any:
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


def parameterNodeWrapper(cls: type) -> type:
    """A class with the annotated fields (defaults as declared, node fields None) over a real
    parameter node. Slicer's wrapper also stores the values in the node and binds the GUI; the
    Logic only reads and writes the fields."""
    fields = dict(getattr(cls, "__annotations__", {}))

    def __init__(self: Any, parameterNode: Any) -> None:
        self.parameterNode = parameterNode
        for name in fields:
            setattr(self, name, getattr(cls, name, None))

    return type(cls.__name__, (), {"__init__": __init__, "__doc__": cls.__doc__, "__annotations__": fields})


def Choice(choices: Any) -> tuple:  # noqa: N802 - Slicer's name
    return ("Choice", tuple(choices))


def WithinRange(minimum: float, maximum: float) -> tuple:  # noqa: N802 - Slicer's name
    return ("WithinRange", minimum, maximum)


class _Database:
    """The application's ctkDICOMDatabase: only where its (real) ctkDICOM.sql file is."""

    def __init__(self, path: Optional[Path]) -> None:
        self.databaseFilename = "" if path is None else str(path)
        self.isOpen = path is not None


class _Environment:
    """What ``slicer.app.startupEnvironment()`` returns (a QProcessEnvironment): here, this
    process's environment, which is the one it started with."""

    def keys(self):
        return list(os.environ)

    def value(self, name: str) -> str:
        return os.environ.get(name, "")


class _App:
    """``slicer.app``: no event loop to run; the DICOM database at ``path``."""

    def __init__(self, path: Optional[Path]) -> None:
        self.database = _Database(path)

    def processEvents(self) -> None:  # noqa: N802 - Qt's name
        pass

    def startupEnvironment(self) -> _Environment:  # noqa: N802 - Slicer's name
        return _Environment()

    def layoutManager(self) -> None:  # noqa: N802 - Slicer's name
        """None, as in a Slicer without its main window (slicer.util then fits no slice view)."""
        return None

    def dicomDatabase(self) -> _Database:  # noqa: N802 - Slicer's name
        return self.database


def _slicer_module_imports() -> list:
    """The imported modules of the Slicer module: LungGradCAM and LungGradCAMSlicer's."""
    return [name for name in sys.modules if name == "LungGradCAM" or name.split(".")[0] == "LungGradCAMSlicer"]


@contextmanager
def slicer_application(scene: Any, dicom_database: Optional[Path] = None) -> Iterator[Dict[str, Any]]:
    """Install the stand-ins and the application's logics for ``scene``; yields the logics by
    module name. Everything is removed afterwards."""
    # what the application adds to every scene before its modules' logics see it: selection and
    # interaction singletons, and a composite node for each slice view of the layout
    for cls in (slicer.vtkMRMLSelectionNode, slicer.vtkMRMLInteractionNode):
        node = cls()
        node.SetSingletonTag("Singleton")
        scene.AddNode(node)
    logics = {
        "volumerendering": slicer.vtkSlicerVolumeRenderingLogic(),
        "markups": slicer.vtkSlicerMarkupsLogic(),
        "colors": slicer.vtkSlicerColorLogic(),
    }
    for logic in logics.values():
        logic.SetMRMLScene(scene)
    for view in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        scene.AddNode(composite)
    modules = {
        "qt": _module("qt", QIcon=lambda *args: None),
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule",
            ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
        ),
        "slicer.parameterNodeWrapper": _module(
            "slicer.parameterNodeWrapper",
            parameterNodeWrapper=parameterNodeWrapper,
            Choice=Choice,
            WithinRange=WithinRange,
        ),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
    }
    attributes = {
        "app": _App(dicom_database),
        "modules": types.SimpleNamespace(
            **{name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in logics.items()}
        ),
    }
    # the Slicer module is imported afresh inside, on these stand-ins, and forgotten afterwards
    saved_modules = {name: sys.modules.get(name) for name in (*modules, *_slicer_module_imports())}
    sys.modules.update(modules)
    for name in _slicer_module_imports():
        del sys.modules[name]
    for name, value in attributes.items():
        setattr(slicer, name, value)
    sys.path.insert(0, str(REPO / "LungGradCAM"))
    try:
        yield logics
    finally:
        sys.path.remove(str(REPO / "LungGradCAM"))
        for name in attributes:
            delattr(slicer, name)
        for name in _slicer_module_imports():
            del sys.modules[name]
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for logic in logics.values():
            logic.SetMRMLScene(None)
