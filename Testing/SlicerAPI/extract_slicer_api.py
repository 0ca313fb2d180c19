"""Extract the Slicer API that LungGradCAM may use from Slicer's (and CTK's) source at pinned revisions.

Writes ``Testing/SlicerAPI/slicer_api.json``, which ``Testing/Python/slicer_module/test_slicer_api.py`` checks the
Slicer module (``LungGradCAM/LungGradCAM.py``) and ``LungGradCAMLib/mrml.py`` against. Only the
list of names and signatures is kept here, never Slicer's code. Regenerate with:

    git clone https://github.com/Slicer/Slicer.git /tmp/Slicer
    git clone https://github.com/commontk/CTK.git /tmp/CTK
    python Testing/SlicerAPI/extract_slicer_api.py --slicer /tmp/Slicer --ctk /tmp/CTK

(both may be bare or mirror clones: files are read with ``git show REV:PATH``). The CTK revision is
the one Slicer's ``SuperBuild/External_CTK.cmake`` pins at ``--slicer-rev``.

What is extracted:

* Python modules (by ``ast``): every public function, class and method with its parameters
  (name, kind, whether it has a default) of ``slicer.util``, ``slicer.ScriptedLoadableModule``,
  ``slicer.parameterNodeWrapper``, ``slicer.i18n`` and ``DICOMLib.DICOMUtils``;
* C++ classes wrapped for Python, with their base classes: VTK classes (MRML nodes, Slicer
  logics, segmentations) with every public method and its argument counts (one [min, max] per
  overload, including the methods VTK's Set/Get/Boolean macros declare); Qt classes of Slicer and
  CTK (qMRML widgets, the application, ctkDICOMDatabase, CTK widgets) with their properties,
  signals, slots and Q_INVOKABLE methods, which are what PythonQt exposes of them, plus what
  Slicer's and CTK's PythonQt decorators add (e.g. ``slicer.app.testingEnabled()``);
* the newest extension catalog entry schema (ExtensionsIndex's ``<Extension>.json``): its
  required and allowed keys, their types and enumerations.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

SLICER_REV = "v5.8.1"
OUT = Path(__file__).with_name("slicer_api.json")

PYTHON_MODULES = {
    "slicer.util": ["Base/Python/slicer/util.py"],
    "slicer.ScriptedLoadableModule": ["Base/Python/slicer/ScriptedLoadableModule.py"],
    "slicer.i18n": ["Base/Python/slicer/i18n.py"],
    "slicer.parameterNodeWrapper": [
        "Base/Python/slicer/parameterNodeWrapper/__init__.py",
        "Base/Python/slicer/parameterNodeWrapper/*.py",
    ],
    "DICOMLib.DICOMUtils": ["Modules/Scripted/DICOMLib/DICOMUtils.py"],
}

#: The C++ classes whose API is listed (with all their bases found in the same sources).
CLASSES = [
    # MRML nodes and scene
    "vtkMRMLScene",
    "vtkMRMLScalarVolumeNode",
    "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLScalarVolumeDisplayNode",
    "vtkMRMLSegmentationNode",
    "vtkMRMLSegmentationDisplayNode",
    "vtkMRMLTableNode",
    "vtkMRMLTransformNode",
    "vtkMRMLLinearTransformNode",
    "vtkMRMLColorTableNode",
    "vtkMRMLPETProceduralColorNode",
    "vtkMRMLSliceCompositeNode",
    "vtkMRMLScriptedModuleNode",
    "vtkMRMLSelectionNode",
    "vtkMRMLInteractionNode",
    "vtkMRMLSubjectHierarchyNode",
    "vtkMRMLMarkupsROINode",
    "vtkMRMLVolumeRenderingDisplayNode",
    "vtkMRMLVolumePropertyNode",
    "vtkMRMLMarkupsFiducialNode",
    "vtkMRMLSubjectHierarchyConstants",
    # segmentations
    "vtkSegmentation",
    "vtkSegment",
    # logics
    "vtkSlicerSegmentationsModuleLogic",
    "vtkSlicerVolumeRenderingLogic",
    "vtkSlicerMarkupsLogic",
    "vtkSlicerColorLogic",
    "vtkSlicerSubjectHierarchyModuleLogic",
    # Qt classes of Slicer and CTK
    "qSlicerApplication",
    "qMRMLNodeComboBox",
    "qMRMLTableView",
    "qMRMLWidget",
    "ctkDICOMDatabase",
    "ctkCollapsibleButton",
    "ctkSliderWidget",
]
#: Where class headers are searched (file name = class name + ".h").
HEADER_ROOTS = {"slicer": ("Libs/", "Base/", "Modules/Loadable/"), "ctk": ("Libs/",)}
SCHEMA = re.compile(r"Schemas/slicer-extension-catalog-entry-schema-v(\d+)\.(\d+)\.(\d+)\.json")


def git_show(repo: Path, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir(repo)}", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def git_files(repo: Path, rev: str) -> List[str]:
    out = subprocess.run(
        ["git", f"--git-dir={git_dir(repo)}", "ls-tree", "-r", "--name-only", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.splitlines()


def git_rev(repo: Path, rev: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={git_dir(repo)}", "rev-parse", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


# --- Python -----------------------------------------------------------------------------------------
def _params(args: ast.arguments, method: bool) -> List[Tuple[str, str, bool]]:
    """(name, kind, has default) per parameter; ``self``/``cls`` of a method left out."""
    positional = [*args.posonlyargs, *args.args]
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    out = [(a.arg, "posonly" if a in args.posonlyargs else "pos", d) for a, d in zip(positional, defaults)]
    if method and out and out[0][0] in ("self", "cls"):
        out = out[1:]
    if args.vararg:
        out.append((args.vararg.arg, "varargs", False))
    out += [(a.arg, "kwonly", d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append((args.kwarg.arg, "varkw", False))
    return out


def _self_attributes(cls: ast.ClassDef) -> List[str]:
    """Attributes the class's methods assign on ``self`` (e.g. ``self.layout``)."""
    names = set()
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and not node.attr.startswith("__")
        ):
            names.add(node.attr)
    return sorted(names)


def python_api(sources: Iterable[str]) -> dict:
    functions, classes, names = {}, {}, set()
    for text in sources:
        tree = ast.parse(text)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                functions[node.name] = _params(node.args, method=False)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                methods = {
                    n.name: _params(
                        n.args,
                        method=not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in n.decorator_list),
                    )
                    for n in node.body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and (not n.name.startswith("_") or n.name == "__init__")
                }
                classes[node.name] = {
                    "bases": [ast.unparse(b) for b in node.bases],
                    "methods": methods,
                    "attributes": _self_attributes(node),
                }
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_"))
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                names.update(a.asname or a.name for a in node.names if a.name != "*")
    names -= set(functions) | set(classes)
    return {"functions": functions, "classes": classes, "names": sorted(names)}


# --- C++ ----------------------------------------------------------------------------------------------
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/|^\s*#[^\n]*", re.S | re.M)
_CLASS = re.compile(r"\bclass\s+(?:\w+_EXPORT\s+)?(\w+)\s*(?::\s*([^{;]+))?\{")


def _class_body(text: str, name: str) -> Tuple[List[str], str]:
    """(base class names, body text) of class ``name`` in a header."""
    for match in _CLASS.finditer(text):
        if match.group(1) != name:
            continue
        bases = [
            re.sub(r"\b(public|protected|private|virtual)\b", "", b).strip()
            for b in (match.group(2) or "").split(",")
            if "public" in b
        ]
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return [re.sub(r"<.*", "", b).split("::")[-1] for b in bases if b], text[start:i]
    raise ValueError(f"class {name} not found")


_ACCESS = re.compile(r"\b(?:(public|protected|private)\s*(Q_SLOTS|slots)?|(signals|Q_SIGNALS))\s*:(?!:)")
#: Lines that end without a semicolon: Qt's and VTK's declaring macros.
_LINE_MACROS = re.compile(
    r"^\s*(Q_OBJECT|QVTK_OBJECT|Q_(?:PROPERTY|ENUMS?|FLAGS?|DECLARE_\w+|DISABLE_COPY)\s*\([^\n]*\))\s*$", re.M
)


def _statements(body: str) -> Iterable[Tuple[str, str]]:
    """(access, statement) for each member declaration of a class body: access labels become
    markers, inline bodies and nested braces are dropped, statements split at semicolons."""
    body = _LINE_MACROS.sub(lambda m: m.group(1) + ";", body)
    flat, depth = [], 0
    for c in body:  # drop everything inside braces (inline bodies, nested enums and structs)
        if c == "{":
            depth += 1
            if depth == 1:
                flat.append(";")
        elif c == "}":
            depth -= 1
        elif depth == 0:
            flat.append(c)
    text = _ACCESS.sub(
        lambda m: (
            ";@access " + ("public:signals" if m.group(3) else m.group(1) + (":slots" if m.group(2) else "")) + ";"
        ),
        "".join(flat),
    )
    access = "private"
    for statement in text.split(";"):
        statement = statement.strip()
        if statement.startswith("@access "):
            access = statement.split(" ", 1)[1]
        elif statement:
            yield access, statement


def _split_top(text: str) -> List[str]:
    parts, depth, current = [], 0, []
    for c in text:
        if c in "(<[{":
            depth += 1
        elif c in ")>]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip() and p.strip() != "void"]


#: VTK's declaring macros -> the methods they make (argument counts).
_MACROS = {
    "vtkGetMacro": [("Get{}", 0, 0)],
    "vtkSetMacro": [("Set{}", 1, 1)],
    "vtkGetObjectMacro": [("Get{}", 0, 0)],
    "vtkSetObjectMacro": [("Set{}", 1, 1)],
    "vtkGetStringMacro": [("Get{}", 0, 0)],
    "vtkSetStringMacro": [("Set{}", 1, 1)],
    "vtkSetStdStringFromCharMacro": [("Set{}", 1, 1)],
    "vtkGetStdStringMacro": [("Get{}", 0, 0)],
    "vtkSetStdStringMacro": [("Set{}", 1, 1)],
    "vtkGetCharFromStdStringMacro": [("Get{}", 0, 0)],
    "vtkBooleanMacro": [("{}On", 0, 0), ("{}Off", 0, 0)],
    "vtkSetClampMacro": [("Set{}", 1, 1)],
    "vtkGetEnumMacro": [("Get{}", 0, 0)],
    "vtkSetEnumMacro": [("Set{}", 1, 1)],
    "vtkGetVector2Macro": [("Get{}", 0, 2)],
    "vtkSetVector2Macro": [("Set{}", 1, 2)],
    "vtkGetVector3Macro": [("Get{}", 0, 3)],
    "vtkSetVector3Macro": [("Set{}", 1, 3)],
    "vtkGetVector4Macro": [("Get{}", 0, 4)],
    "vtkSetVector4Macro": [("Set{}", 1, 4)],
    "vtkGetVector6Macro": [("Get{}", 0, 6)],
    "vtkSetVector6Macro": [("Set{}", 1, 6)],
    "vtkGetVectorMacro": [("Get{}", 0, 1)],
    "vtkSetVectorMacro": [("Set{}", 1, 16)],
    "vtkGetSmartPointerMacro": [("Get{}", 0, 0)],
    "vtkSetSmartPointerMacro": [("Set{}", 1, 1)],
}
_NOT_METHODS = {
    "if",
    "for",
    "while",
    "switch",
    "return",
    "sizeof",
    "operator",
    "Q_PROPERTY",
    "Q_ENUM",
    "Q_ENUMS",
    "Q_FLAGS",
    "Q_FLAG",
    "Q_DECLARE_PRIVATE",
    "Q_DECLARE_PUBLIC",
    "Q_DISABLE_COPY",
    "Q_OBJECT",
    "Q_DECLARE_FLAGS",
    "vtkTypeMacro",
    "QVTK_OBJECT",
}


def cpp_class(text: str, name: str) -> dict:
    bases, body = _class_body(_COMMENTS.sub("", text), name)
    methods: Dict[str, List[List[int]]] = {}
    properties, signals, slots, invokable = set(), set(), set(), set()
    qt = "Q_OBJECT" in body
    for access, statement in _statements(body):
        statement = re.sub(r"\s+", " ", statement)
        prop = re.match(r"Q_PROPERTY\((.+?)\s+(\w+)\s+(READ|WRITE|MEMBER)\b", statement)
        if prop:
            properties.add(prop.group(2))
            continue
        macro = re.match(r"(vtk\w+Macro)\((\w+)", statement)
        if macro and access.startswith("public") and macro.group(1) in _MACROS:
            for pattern, low, high in _MACROS[macro.group(1)]:
                methods.setdefault(pattern.format(macro.group(2)), []).append([low, high])
            continue
        call = re.match(
            r"(?:[\w:<>,*&~\s]*?\s)?[*&]*(~?\w+)\s*\((.*)\)\s*(const)?\s*(override|final|=\s*0|=\s*delete"
            r"|=\s*default|VTK_\w+(\(.*\))?)?\s*(override)?\s*$",
            statement.replace("Q_INVOKABLE ", "QINV "),
        )
        if (
            not call
            or not access.startswith("public")
            or call.group(1) in _NOT_METHODS
            or call.group(1).startswith("~")
            or call.group(1) == name
            or "= delete" in statement
        ):
            continue
        method, params = call.group(1), _split_top(call.group(2))
        arity = [sum("=" not in p for p in params), len(params)]
        if any(p.strip() == "..." for p in params):
            arity = [arity[0] - 1, 99]
        if qt:
            if access.endswith("signals"):
                signals.add(method)
            elif access.endswith("slots"):
                slots.add(method)
            elif statement.startswith("Q_INVOKABLE") or statement.startswith("static "):
                invokable.add(method)
            else:
                continue  # a plain public method of a QObject: PythonQt does not expose it
        methods.setdefault(method, []).append(arity)
    out = {
        "bases": bases,
        "kind": "qt" if qt else "vtk",
        "methods": {k: sorted(map(list, {tuple(a) for a in v})) for k, v in sorted(methods.items())},
    }
    if qt:
        out.update(
            properties=sorted(properties), signals=sorted(signals), slots=sorted(slots), invokable=sorted(invokable)
        )
    return out


def cpp_api(repos: Dict[str, Tuple[Path, str]]) -> dict:
    index = {}
    for key, (repo, rev) in repos.items():
        for path in git_files(repo, rev):
            if path.endswith(".h") and path.startswith(HEADER_ROOTS[key]) and "/Testing/" not in path:
                index.setdefault(Path(path).stem, (key, path))
    classes, todo = {}, list(CLASSES)
    while todo:
        name = todo.pop()
        if name in classes or name not in index:
            continue
        key, path = index[name]
        repo, rev = repos[key]
        classes[name] = {"header": f"{key}:{path}", **cpp_class(git_show(repo, rev, path), name)}
        todo += classes[name]["bases"]
    missing = sorted(set(CLASSES) - set(classes))
    if missing:
        raise SystemExit(f"classes not found in the sources: {missing}")
    for key, (repo, rev) in repos.items():  # what PythonQt decorators add to the classes
        for path in git_files(repo, rev):
            if path.endswith("PythonQtDecorators.h") and path.startswith(HEADER_ROOTS[key]):
                _add_decorated(classes, git_show(repo, rev, path))
    return dict(sorted(classes.items()))


def _add_decorated(classes: dict, text: str) -> None:
    """A decorator class's public slots: ``static_<Class>_<name>(...)`` is a static method of
    ``Class``, ``<name>(Class* self, ...)`` a method of its instances; both callable from Python."""
    text = _COMMENTS.sub("", text)
    bodies = [
        _class_body(text, name)[1]
        for name in dict.fromkeys(re.findall(r"\bclass\s+(?:\w+\s+)?(\w+PythonQtDecorators)\s*:", text))
    ]
    for access, statement in (item for body in bodies for item in _statements(body)):
        call = re.match(r".*?[\s*&](\w+)\s*\((.*)\)\s*(const)?\s*(\{.*)?$", re.sub(r"\s+", " ", statement))
        if not call or not access.endswith("slots"):
            continue
        params = [p for p in _split_top(call.group(2)) if p.strip()]
        static = re.fullmatch(r"static_(q\w+?|ctk\w+?|vtk\w+?)_(\w+)", call.group(1))
        if static:
            owner, method = static.groups()
        elif params and re.match(r"\s*(?:const\s+)?(\w+)\s*\*", params[0]):
            owner, method, params = re.match(r"\s*(?:const\s+)?(\w+)", params[0]).group(1), call.group(1), params[1:]
        else:
            continue
        if owner in classes:
            entry = classes[owner]
            entry["methods"].setdefault(method, []).append([sum("=" not in p for p in params), len(params)])
            entry["methods"] = dict(sorted(entry["methods"].items()))
            if "invokable" in entry and method not in entry["invokable"]:
                entry["invokable"] = sorted(entry["invokable"] + [method])


def catalog_schema(repo: Path, rev: str) -> Optional[dict]:
    """The newest extension catalog entry schema of the revision, in short (None before Slicer had one)."""
    versions = {tuple(map(int, m.groups())): m.group(0) for m in map(SCHEMA.fullmatch, git_files(repo, rev)) if m}
    if not versions:
        return None
    schema = json.loads(git_show(repo, rev, versions[max(versions)]))
    return {
        "id": schema["$id"],
        "required": schema["required"],
        "additionalProperties": schema.get("additionalProperties", True),
        "properties": {
            k: {f: v[f] for f in ("type", "enum", "minimum", "maximum") if f in v}
            for k, v in schema["properties"].items()
        },
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer", type=Path, required=True, help="a clone of github.com/Slicer/Slicer")
    parser.add_argument("--slicer-rev", default=SLICER_REV, help=f"Slicer tag or commit (default {SLICER_REV})")
    parser.add_argument("--ctk", type=Path, required=True, help="a clone of github.com/commontk/CTK")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    slicer_sha = git_rev(args.slicer, args.slicer_rev)
    pinned = re.search(
        r'Slicer_\$\{proj\}_GIT_TAG\s*"([0-9a-f]{40})"',
        git_show(args.slicer, slicer_sha, "SuperBuild/External_CTK.cmake"),
    ).group(1)
    files = git_files(args.slicer, slicer_sha)
    python = {}
    for module, patterns in PYTHON_MODULES.items():
        paths = [f for p in patterns for f in files if Path(f).match(p) and Path(f).parent == Path(p).parent]
        python[module] = python_api(git_show(args.slicer, slicer_sha, f) for f in dict.fromkeys(paths))
    api = {
        "slicer": {"revision": args.slicer_rev, "commit": slicer_sha},
        "ctk": {"commit": pinned, "pinned_by": "SuperBuild/External_CTK.cmake"},
        "command": "python Testing/SlicerAPI/extract_slicer_api.py --slicer SLICER_CLONE --ctk CTK_CLONE"
        + (f" --slicer-rev {args.slicer_rev}" if args.slicer_rev != SLICER_REV else ""),
        "python": python,
        "classes": cpp_api({"slicer": (args.slicer, slicer_sha), "ctk": (args.ctk, pinned)}),
        "extension_catalog_entry_schema": catalog_schema(args.slicer, slicer_sha),
    }
    text = json.dumps(api, indent=1)
    # innermost lists (argument counts, parameters, name lists) on one line each: a short, diffable file
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    args.out.write_text(text + "\n")
    print(
        f"{args.out}: {len(api['classes'])} classes, {sum(len(m['functions']) for m in python.values())} "
        f"Python functions (Slicer {args.slicer_rev} {slicer_sha[:10]}, CTK {pinned[:10]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
