"""What an execution's hyperparameters may say, asked of the trainer's own argument parser.

There is no second list of names, types or ranges to drift: ``ml/train.py``'s ``build_parser`` is the only one.
The prepare Lambda has no torch (no room for it in a Lambda zip) and ``ml/train.py`` imports torch at the top,
so the module cannot be imported here. Instead ``build_parser`` is compiled from the source text together with
the top-level helpers and constants it uses (``Bounded``, ``str2bool``, ``NOT_HYPERPARAMETERS``); a name that
``ml/train.py`` imports from another ``ml`` module is imported where that module loads, and otherwise taken from
the literal assignment in that module's source (``LITE_SCALING`` in ``ml/model.py`` is a plain dict).

Each hyperparameter is then checked the way the job will use it: SageMaker's training toolkit ``json.loads``
each value of the request and passes ``--name str(value)`` to the entry point (sagemaker_training.mapping.
to_cmd_args), so the same argv goes through the parser here, and the parser's own message is the answer.
"""

from __future__ import annotations
import __future__

import argparse
import ast
import difflib
import importlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TRAIN_SOURCE = Path(__file__).resolve().parents[2] / "ml" / "train.py"
_STDLIB = frozenset(sys.stdlib_module_names)


class HyperparameterError(ValueError):
    """A hyperparameter the trainer would refuse or must not be given (``name`` None: the whole map)."""

    def __init__(self, name: str | None, problem: str) -> None:
        super().__init__(f"{name}: {problem}" if name else problem)
        self.name, self.problem = name, problem

    def where(self, prefix: str) -> str:
        """The message led by the field's path as the user wrote it, e.g. training.hyperparameters.lr."""
        return f"{prefix}.{self.name}: {self.problem}" if self.name else f"{prefix}: {self.problem}"


@dataclass(frozen=True)
class Trainer:
    """The trainer's command line, as ml/train.py declares it."""

    parser: argparse.ArgumentParser
    not_hyperparameters: frozenset[str]  # container-owned paths and test knobs
    reserved_prefixes: tuple[str, ...]  # what SageMaker adds itself (sagemaker_*, _tuning_objective_metric)

    def option(self, name: str) -> argparse.Action | None:
        return self.parser._option_string_actions.get(f"--{name}")

    def settable(self) -> list[str]:
        """The names an execution may set: every long option but the container's, the tests' and --help."""
        names = (option[2:] for action in self.parser._actions for option in action.option_strings
                 if option.startswith("--"))
        return sorted(name for name in names if name not in self.not_hyperparameters and name != "help")


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    named: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            named[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    named[target.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                named[alias.asname or alias.name.split(".")[0]] = node
    return named


def _literal_from_source(module: str, name: str, root: Path) -> Any:
    """``name``'s value in ``module`` read from its source without running it (it needs torch)."""
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ImportError(f"{module}.{name} is neither importable here nor a literal in {path}")


def _resolve_import(node: ast.Import | ast.ImportFrom, name: str, root: Path) -> Any:
    if isinstance(node, ast.Import):
        module = next(alias.name for alias in node.names if (alias.asname or alias.name.split(".")[0]) == name)
        if module.split(".")[0] not in _STDLIB:
            raise ImportError(f"{module} is not needed to build the parser")
        return importlib.import_module(module)
    alias = next(alias for alias in node.names if (alias.asname or alias.name) == name)
    module = node.module or ""
    try:
        return getattr(importlib.import_module(module), alias.name)
    except (ImportError, AttributeError):
        if module.split(".")[0] != "ml":
            raise
        return _literal_from_source(module, alias.name, root)


def load_trainer(source: Path = TRAIN_SOURCE) -> Trainer:
    """Compile ``build_parser`` and what it uses from ``source`` (an ``ml/train.py``) and build the parser."""
    tree = ast.parse(source.read_text(), filename=str(source))
    named = _top_level(tree)
    root = source.parent.parent
    wanted = ["build_parser", "NOT_HYPERPARAMETERS", "SAGEMAKER_RESERVED_PREFIXES"]
    namespace: dict[str, Any] = {"__name__": "ml.train.arguments", "__builtins__": __builtins__}
    chosen: list[ast.stmt] = []
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in seen or name not in named:
            continue  # a local variable, a parameter or a builtin
        seen.add(name)
        node = named[name]
        if isinstance(node, ast.Import | ast.ImportFrom):
            try:
                namespace[name] = _resolve_import(node, name, root)
            except ImportError:
                continue  # torch and friends: fine unless the parser really calls it (then NameError below)
            continue
        if node not in chosen:
            chosen.append(node)
        wanted += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    chosen.sort(key=lambda node: node.lineno)
    code = compile(ast.Module(body=chosen, type_ignores=[]), str(source), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return Trainer(parser=namespace["build_parser"](), not_hyperparameters=namespace["NOT_HYPERPARAMETERS"],
                   reserved_prefixes=tuple(namespace["SAGEMAKER_RESERVED_PREFIXES"]))


@cache
def trainer() -> Trainer:
    return load_trainer(TRAIN_SOURCE)


class _Refusal(Exception):
    pass


def _raise(message: str) -> None:
    raise _Refusal(message)


def toolkit_value(value: Any) -> str:
    """What the entry point sees for a request value: the request carries ``json.dumps(value)``, the toolkit
    ``json.loads`` it and formats it with ``str`` (so ``True`` arrives as ``True``, ``NaN`` as ``nan``)."""
    return str(json.loads(json.dumps(value)))


def check_value(name: str, value: Any, *, owner: Trainer | None = None) -> None:
    """Refuse a value of hyperparameter ``name`` that the trainer's parser would refuse."""
    owner = owner or trainer()
    action = owner.option(name)
    if action is None:
        raise HyperparameterError(name, "not an argument of ml.train")
    parser = owner.parser
    # parse_known_args ends with parser.error(), which prints and exits; here it must raise instead.
    parser.error = _raise  # type: ignore[method-assign]
    parser.exit_on_error = False
    try:
        _, extra = parser.parse_known_args([f"--{name}", toolkit_value(value)])
    except (_Refusal, argparse.ArgumentError) as error:
        message = str(error).removeprefix(f"argument --{name}: ")
        raise HyperparameterError(name, message) from None
    if extra:
        raise HyperparameterError(name, f"ml.train takes no value after --{name}, got {value!r}")


def check_name(name: str, *, owner: Trainer | None = None) -> None:
    owner = owner or trainer()
    # Case-insensitively: the toolkit only strips "sagemaker_*" exactly, so "SAGEMAKER_program" would reach
    # the trainer as an argument, and whatever its case it means the container's settings.
    if name.lower().startswith(("sagemaker", *owner.reserved_prefixes)):
        raise HyperparameterError(name, "reserved for SageMaker and its container (sagemaker_*, _*)")
    if name in owner.not_hyperparameters:
        raise HyperparameterError(
            name, "set by SageMaker or for tests only; an execution may not change it (its channels and "
            "paths come from the training request itself)"
        )
    if name not in owner.settable():
        # An option the parser has but an execution may not set (--help would print the help and exit).
        close = difflib.get_close_matches(name, owner.settable(), n=1)
        hint = f"did you mean {close[0]}?" if close else f"it takes {', '.join(owner.settable())}"
        raise HyperparameterError(name, f"not an argument of ml.train; {hint}")


def check_hyperparameters(hyperparameters: Mapping[str, Any], *, max_entries: int, max_value_length: int,
                          owner: Trainer | None = None) -> None:
    """Every name and value, then SageMaker's limits on the map (which the request's own entries share)."""
    if len(hyperparameters) > max_entries:
        raise HyperparameterError(
            None, f"at most {max_entries} hyperparameters fit in the request next to the container's own, "
            f"got {len(hyperparameters)}"
        )
    for name, value in hyperparameters.items():
        encoded = json.dumps(value)
        if len(encoded) > max_value_length:
            raise HyperparameterError(name, f"SageMaker takes values of at most {max_value_length} characters, "
                                      f"got {len(encoded)}")
        check_name(name, owner=owner)
        check_value(name, value, owner=owner)
