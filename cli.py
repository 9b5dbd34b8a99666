"""The one command-line layer of the entry scripts (sft, dpo, softmax_dpo, inference, sasrec, reproduce,
benchmark, data_interface, list_recall, tiny_build).

    if __name__ == "__main__":
        cli.run(main)                      # or cli.run({"train": train, ...}) for sub-commands

`run` parses argv against the function's signature before anything runs (an unknown flag is an error that
suggests the nearest known one; fire's chaining never sees it), hands the command line to fire, turns any
`NapoError` into one line `error: ...` on stderr (exit status 2) and shuts the process group down. Every
option is checked in one place, `check_options`, from the function's annotation (int, float, bool, str) and
the rule of its name in RULES (ranges, choices, paths that must exist); `@cli.validated` applies it to every
call of a stage's `main`, from the command line or from Python, before any model is loaded or file written.

RULES holds the generic rules (sizes, rates, fractions, paths); the module that owns an option's meaning adds
its rule at import (`cli.add_rules(...)`: data_interface --dataset/--protocol/--split, modeling --base_model,
napo_config --margin_mode), so this module imports nothing of the project but errors.py, and nothing heavy.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import sys
import types
from pathlib import Path

from errors import NapoError, OptionError

EXIT_ERROR = 2


# --------------------------------------------------------------------------------------------------
# Rules: one per option name, shared by every script that has an option of that name


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


class Rule:
    """A range and/or a check for one option. `lo`/`hi` are inclusive bounds; `check(name, value)` returns the
    (possibly normalised) value or raises a NapoError; `none` allows None whatever the default."""

    def __init__(self, lo=None, hi=None, choices=None, check=None, none=False, gt=None):
        self.lo, self.hi, self.gt, self.choices, self.check, self.none = lo, hi, gt, choices, check, none

    def __call__(self, name, v):
        if v is None:
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise OptionError(f"--{name} {v}: expected a finite number")
            if self.gt is not None and not v > self.gt:
                raise OptionError(f"--{name} {v}: must be > {self.gt}")
            if self.lo is not None and self.hi is not None and not self.lo <= v <= self.hi:
                raise OptionError(f"--{name} {v}: must be between {self.lo} and {self.hi}")
            if self.lo is not None and v < self.lo:
                raise OptionError(f"--{name} {v}: must be >= {self.lo}")
            if self.hi is not None and v > self.hi:
                raise OptionError(f"--{name} {v}: must be <= {self.hi}")
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            if v not in choices:
                near = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise OptionError(f"--{name} {_fmt(v)}: choose one of {', '.join(map(str, choices))}{hint}")
        if self.check is not None:
            v = self.check(name, v)
        return v


def existing_folder(name, v):
    if not Path(str(v)).is_dir():
        raise OptionError(f"--{name} {str(v)!r}: no such folder")
    return str(v)


def _checkpoint_or_true(name, v):
    """None (start fresh), True (the latest checkpoint-N of --output_dir) or an existing folder."""
    if v in ("", False):
        return None
    if v is True or str(v) == "True":
        return True
    return existing_folder(name, v)


def _output_path(name, v):
    if Path(str(v)).exists() and not Path(str(v)).is_dir():
        raise OptionError(f"--{name} {str(v)!r}: exists and is not a folder")
    return str(v)


def _lr_schedulers():
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


POSITIVE_INT = Rule(lo=1)
COUNT = Rule(lo=0)
ROWS = Rule(lo=-1)          # -1 = all rows
RATE = Rule(gt=0)
FRACTION = Rule(lo=0, hi=1)

RULES: dict[str, Rule] = {
    # sizes and counts
    "batch_size": POSITIVE_INT, "gradient_accumulation_steps": POSITIVE_INT, "num_train_epochs": POSITIVE_INT,
    "cutoff_len": POSITIVE_INT, "logging_steps": POSITIVE_INT, "max_new_tokens": POSITIVE_INT,
    "lora_r": POSITIVE_INT, "lora_alpha": RATE, "save_steps": COUNT, "seed": COUNT, "epochs": POSITIVE_INT,
    "patience": POSITIVE_INT, "num_threads": POSITIVE_INT, "threads": POSITIVE_INT, "steps": POSITIVE_INT,
    "warmup": COUNT, "rank_rows": POSITIVE_INT, "rank_repeats": POSITIVE_INT, "gen_rows": POSITIVE_INT,
    "max_train_samples": ROWS, "max_eval_samples": ROWS, "max_test_samples": ROWS, "max_steps": ROWS,
    "sft_rows": ROWS, "pref_rows": ROWS, "test_rows": ROWS, "max_samples": ROWS,
    "time_budget_s": Rule(gt=0, none=True),
    # rates and weights
    "learning_rate": RATE, "lr": RATE, "beta": RATE, "max_grad_norm": Rule(lo=0), "warmup_ratio": FRACTION,
    "eval_step": Rule(lo=0), "lora_dropout": Rule(lo=0, hi=0.99), "dropout": Rule(lo=0, hi=0.99),
    "weight_decay": Rule(lo=0), "rho": FRACTION, "momentum": FRACTION, "gamma0": Rule(lo=0),
    "num_negatives": Rule(lo=1, hi=19),  # K: one negative per non-target candidate at most (NUM_CANDIDATES - 1)
    # choices
    "quantize": Rule(choices=("auto", "4bit", "none")), "scoring_mode": Rule(choices=("shared", "naive")),
    "lr_scheduler_type": Rule(choices=_lr_schedulers),
    # paths (--dataset and --base_model: their modules' rules, add_rules)
    "resume_from_checkpoint": Rule(check=_checkpoint_or_true), "sasrec_checkpoint": Rule(check=existing_folder),
    "start_adapter": Rule(check=existing_folder), "adapter": Rule(check=existing_folder),
    "checkpoint": Rule(check=existing_folder), "output_dir": Rule(check=_output_path),
}


def add_rules(**rules: Rule) -> None:
    """The rules of the options a module owns (e.g. data_interface: --dataset, --protocol, --split), added to
    RULES when that module is imported; every entry script imports the modules whose options it takes."""
    RULES.update(rules)


# --------------------------------------------------------------------------------------------------
# Types


def _coerce(name, kind, v):
    """The value as the annotated type, or an OptionError naming the flag."""
    if kind is bool:
        if isinstance(v, bool):
            return v
        raise OptionError(f"--{name} {_fmt(v)}: expected True or False")
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not v.is_integer():
            raise OptionError(f"--{name} {_fmt(v)}: expected an integer")
        return int(v)
    if kind is float:
        if isinstance(v, str):
            try:
                f = float(v)  # 'nan' / 'inf' reach here as strings (fire keeps them so)
            except ValueError:
                raise OptionError(f"--{name} {_fmt(v)}: expected a number") from None
            if math.isfinite(f):  # a string fire left alone that still spells a finite number
                return f
            raise OptionError(f"--{name} {_fmt(v)}: expected a finite number")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OptionError(f"--{name} {_fmt(v)}: expected a number")
        if not math.isfinite(v):
            raise OptionError(f"--{name} {v}: expected a finite number")
        return float(v)
    if kind is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (tuple, list)):  # fire reads a,b as a tuple
            return ",".join(map(str, v))
        if isinstance(v, (int, float, bool)):
            return str(v)
        raise OptionError(f"--{name} {v!r}: expected a string")
    if kind is tuple:
        items = v if isinstance(v, (tuple, list)) else (v,)
        return tuple(_coerce(name, int, x) if isinstance(x, (int, float)) else x for x in items)
    return v


_KINDS = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}


def _kind(annotation, default):
    if isinstance(annotation, str):
        base = annotation.replace(" ", "").split("|")
        base = [b for b in base if b != "None"]
        if len(base) == 1 and base[0] in _KINDS:
            return _KINDS[base[0]]
        return None
    if annotation in _KINDS.values():
        return annotation
    if annotation is inspect.Parameter.empty and isinstance(default, (bool, int, float, str)):
        return type(default)
    return None


def check_options(values: dict, signature: inspect.Signature | None = None, rules: dict | None = None) -> dict:
    """Every option of `values` checked and normalised: by its parameter's annotation (or its default's type)
    in `signature`, then by the rule of its name. Raises OptionError (or a DataError / ModelError from a path
    check) naming the flag. Used by @validated and by config objects (NAPOConfig.validate)."""
    rules = {**RULES, **(rules or {})}
    out = {}
    for name, v in values.items():
        p = signature.parameters.get(name) if signature is not None else None
        default = p.default if p is not None else inspect.Parameter.empty
        rule = rules.get(name)
        if v is None and (default is None or (rule is not None and rule.none) or p is None):
            out[name] = None
            continue
        if v is None and p is not None and p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out[name] = v
            continue
        kind = _kind(p.annotation if p is not None else inspect.Parameter.empty, default)
        if kind is not None and not (name == "resume_from_checkpoint" and v is True):
            v = _coerce(name, kind, v)
        if rule is not None:
            v = rule(name, v)
        out[name] = v
    return out


def checked_call(sig: inspect.Signature, rules: dict, args, kwargs) -> inspect.BoundArguments:
    """A call's arguments bound to `sig` (defaults applied), each checked and normalised by check_options; a call
    that does not fit the signature is an OptionError."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise OptionError(str(e)) from None
    bound.apply_defaults()
    for k, v in check_options(dict(bound.arguments), sig, rules).items():
        bound.arguments[k] = v
    return bound


def validated(fn=None, **rules):
    """Decorator: check every option of each call (annotations + RULES, and the extra `rules` given here)
    before the body runs. The signature seen by fire and `--help` is the function's own."""
    def wrap(f):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def inner(*args, **kwargs):
            bound = checked_call(sig, rules, args, kwargs)
            return f(*bound.args, **bound.kwargs)

        inner.__napo_validated__ = True
        return inner

    return wrap(fn) if fn is not None else wrap


# --------------------------------------------------------------------------------------------------
# Options with help, defined once and shared by several entry functions


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option of an entry function: its name, default, type (int, float, bool or str), one line of help,
    and a Rule of its own where the name's rule in RULES does not fit."""
    name: str
    default: object
    kind: type
    help: str
    rule: Rule | None = None


def opts_of(config_class) -> list[Opt]:
    """The Opts of a dataclass whose fields carry their help (`field(default=..., metadata={"help": ...})`)."""
    out = []
    for f in dataclasses.fields(config_class):
        kind = _KINDS.get(f.type, f.type) if isinstance(f.type, str) else f.type
        out.append(Opt(f.name, f.default, kind, f.metadata.get("help", "")))
    return out


def entry(*groups: list[Opt], **defaults):
    """Decorator for an entry function `body(o)` that takes one namespace `o` of options: the options of `groups`
    (in order; a later one of the same name replaces an earlier one), their defaults changed by `defaults` (the
    entry's own values). The decorated function has the flat signature of those options (fire's flags; Python
    callers pass keywords) and a docstring whose `Args:` section is every option's help, so `--help` prints a
    line per flag; every call is checked by check_options before the body runs."""
    def wrap(body):
        merged: dict[str, Opt] = {}
        for group in groups:
            for o in group:
                merged[o.name] = o
        unknown = set(defaults) - set(merged)
        if unknown:
            raise TypeError(f"cli.entry: defaults for unknown options {sorted(unknown)}")
        params = [inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=defaults.get(o.name, o.default), annotation=o.kind.__name__)
                  for o in merged.values()]
        sig = inspect.Signature(params)
        rules = {o.name: o.rule for o in merged.values() if o.rule is not None}

        @functools.wraps(body, assigned=("__module__", "__name__", "__qualname__"), updated=())
        def main(*args, **kwargs):
            return body(types.SimpleNamespace(**checked_call(sig, rules, args, kwargs).arguments))

        main.__signature__ = sig
        main.__doc__ = (inspect.cleandoc(body.__doc__ or "") + "\n\nArgs:\n"
                        + "\n".join(f"    {o.name}: {o.help}" for o in merged.values()))
        main.__napo_validated__ = True
        main.__napo_options__ = merged
        return main

    return wrap


def document(helps: dict[str, str]):
    """Decorator: append to a function's docstring an `Args:` section with the help of each of its parameters,
    taken from `helps` (one dict shared by the commands of a script, so a flag's help is written once)."""
    def wrap(fn):
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        fn.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n"
                      + "\n".join(f"    {n}: {helps.get(n, '')}" for n in names))
        return fn

    return wrap


# --------------------------------------------------------------------------------------------------
# argv


def _is_flag(arg: str) -> bool:
    """fire's rule: a leading hyphen that is not a negative number."""
    return arg.startswith("--") or bool(re.match(r"^-[a-zA-Z]", arg))


def _suggest(key: str, names) -> str:
    near = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean --{near[0]}?)" if near else f" (known flags: {', '.join('--' + n for n in names)})"


def parse_argv(fn, argv: list[str], prog: str = "") -> dict:
    """The keyword arguments fire will pass for `argv` (strings, not yet parsed), or an OptionError for an
    unknown flag, a flag without a value, a missing required argument or a stray positional argument."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    given, positional, skip = {}, [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if not _is_flag(arg):
            positional.append(arg)
            continue
        stripped = arg.lstrip("-")
        key, eq, value = stripped.partition("=")
        key = key.replace("-", "_")
        bool_syntax = not eq and (i + 1 == len(argv) or _is_flag(argv[i + 1]))
        if len(key) == 1 and key not in names:  # fire's shortcut: -d for the one flag starting with d
            match = [n for n in names if n[0] == key]
            if len(match) > 1:
                raise OptionError(f"{prog}-{key} is ambiguous: {', '.join('--' + n for n in match)}")
            key = match[0] if match else key
        if key not in names and not takes_kwargs:
            if bool_syntax and key.startswith("no") and key[2:] in names:
                given[key[2:]] = "False"
                continue
            raise OptionError(f"{prog}unknown flag --{key}{_suggest(key, names)}")
        if eq:
            given[key] = value
        elif bool_syntax:
            given[key] = "True"
        else:
            given[key] = argv[i + 1]
            skip = True
    # positional arguments fill only the required parameters (a stray word must not become --base_model)
    free = [p.name for p in params if p.default is p.empty and p.name not in given]
    for n, v in zip(free, positional):
        given[n] = v
    if len(positional) > len(free):
        raise OptionError(f"{prog}unexpected argument {positional[len(free)]!r} (options are given as --name value)")
    for p in params:
        if p.default is p.empty and p.name not in given:
            raise OptionError(f"{prog}--{p.name} is required")
    return given


def renamed(new_value, old_value, old: str, new: str):
    """The value of an option given under its old name `old` (deprecated) or its new one `new`: the old spelling
    still works, with a one-line warning; both at once with different values is an OptionError."""
    if old_value in (None, ""):
        return new_value
    if new_value not in (None, "") and str(new_value) != str(old_value):
        raise OptionError(f"{old} {old_value} and {new} {new_value}: give {new} only ({old} is its old name)")
    print(f"warning: {old} is deprecated here; use {new} (same meaning)", file=sys.stderr, flush=True)
    return old_value


def end_distributed() -> None:
    """Shut the torch process group down, on every rank, before a multi-process stage exits: a rank that exits
    with gloo still up can abort in gloo's threads. A no-op where torch.distributed was never imported."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(target, argv: list[str] | None = None, default: str | None = None):
    """The `if __name__ == "__main__":` of every entry script. `target`: a function, or {name: function} for
    sub-commands (`default`: the command when the first argument is a flag or missing)."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if isinstance(target, dict) and default and (not argv or _is_flag(argv[0])) and \
                not {"-h", "--help"} & set(argv[:1]):
            argv = [default] + argv
        ours = argv[:argv.index("--")] if "--" in argv else argv  # after `--`: fire's own flags
        if not {"-h", "--help"} & set(ours):
            fn, prog = target, ""
            if isinstance(target, dict):
                if not ours:
                    raise OptionError(f"give a command: {', '.join(target)}")
                if ours[0] not in target:
                    near = difflib.get_close_matches(ours[0], list(target), n=1)
                    raise OptionError(f"unknown command {ours[0]!r}" + (f" (did you mean {near[0]}?)" if near else "")
                                      + f"; choose one of {', '.join(target)}")
                fn, prog, ours = target[ours[0]], f"{ours[0]}: ", ours[1:]
            parse_argv(fn, ours, prog)
        fire.Fire(target, command=argv, serialize=lambda _: None)
    except NapoError as e:
        sys.stdout.flush()
        if os.environ.get("NAPO_TRACEBACK"):  # for debugging the project itself
            import traceback

            traceback.print_exc()
        print("error: " + str(e).replace("\n", " "), file=sys.stderr, flush=True)
        sys.exit(EXIT_ERROR)
    finally:
        end_distributed()


__all__ = ["NapoError", "OptionError", "RULES", "Rule", "Opt", "add_rules", "check_options", "document", "entry", "opts_of",
           "validated", "parse_argv", "run", "renamed", "end_distributed"]
