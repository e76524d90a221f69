"""Runs of `colaft train`: options -> task, records, split, base model and batches, in one place.

    plan(options)   the task and its recipe filling the options left out (checks; loads nothing)
    load(setup)     records (users dealt out or taken from a column), the held-out split, the base model
    train_batches / eval_batches   the loaders `colaft train` steps and evaluates over

`colaft train` builds a run with these; `colaft eval` rebuilds the same data flow from a run
folder's run.json (`reopen`), so its held-out split and batches are the training run's.
`colaft generate` finds saved adapters (a run folder, its adapters/, or a PEFT folder) with
`find_adapters`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from colaft import data as datasets
from colaft.app import loop
from colaft.io.adapters import CONFIG, USERS, label_maps
from colaft.model import ColaModel
from colaft.tasks import Task, get_task, loader

FIELDS = ("text", "label", "image", "question", "answer")
"""Task fields that a --<field>-field option renames."""
RESOLVED = ("model", "data", "lr", "batch_size", "max_length")
"""Settings the task's recipe fills in (run.json: "resolved")."""
HELD_OUT = 0.1
"""Share of the records held out (per user when there are users)."""


@dataclass
class Setup:
    """What a run's options make: the task and its settings; after `load` the data and base model."""

    task: Task
    task_name: str
    resolved: dict
    seed: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    """Task field -> the data's column (--<field>-field options)."""
    user_field: str | None = None
    users: int | None = None
    """--users K: the records dealt out to K users."""
    records: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    """The users, sorted ([] for data without users)."""
    base: nn.Module | None = None
    labels: list | None = None
    """What the head's outputs mean, in output order (classification; the data's values)."""

    @property
    def multi(self) -> bool:
        return bool(self.user_field) or self.users is not None


def plan(options: Mapping) -> Setup:
    """The task named by `options` (train's keyword arguments) with its recipe's defaults filled in."""
    if options.get("user_field") and options.get("users") is not None:
        raise ValueError("--user-field and --users both make users: give one")
    name = options.get("task") or "sc"
    job = get_task(name)
    recipe, get = job.recipe, options.get
    resolved = {"model": get("model") or recipe.model, "data": get("data") or recipe.data,
                "lr": recipe.lr if get("lr") is None else get("lr"),
                "batch_size": get("batch_size") or recipe.batch_size,
                "max_length": get("max_length") or recipe.max_length}
    fields = {f: get(f"{f}_field") for f in FIELDS if get(f"{f}_field")}
    return Setup(job, name, resolved, get("seed") or 0, fields, get("user_field"), get("users"))


def read_records(setup: Setup, data: str) -> list[dict]:
    """Records of `data` with the run's field options and users (a column, or dealt out by the seed)."""
    records = datasets.load(data, setup.fields, setup.task.fields, setup.user_field)
    if setup.users is not None:
        records = datasets.assign_users(records, setup.users, setup.seed)
    return records


def load(setup: Setup) -> Setup:
    """Read the records, split off the held-out share (every user keeps rows on both sides), load the base."""
    setup.records = read_records(setup, setup.resolved["data"])
    setup.train, setup.held_out = datasets.split(setup.records, HELD_OUT, setup.seed)
    setup.names = sorted({r["user"] for r in setup.records}) if setup.multi else []
    setup.base = setup.task.load(setup.resolved["model"], setup.records, setup.seed)  # labels: all the records'
    return setup


def task_labels(setup: Setup) -> list | None:
    """The loaded task's labels in head-output order: sc's sorted labels, ic's classes 0..K-1; None for clm."""
    if setup.task_name == "ic":
        return list(range(int(setup.base.classifier.out_features)))
    labels = getattr(setup.task, "labels", None)
    return None if labels is None else list(labels)


def name_labels(model: nn.Module, labels: list | None) -> None:
    """Name a transformers model's outputs with the data's labels (its config's id2label/label2id):
    a merged or saved model's config.json then carries them."""
    if labels is not None and hasattr(getattr(model, "config", None), "id2label"):
        model.config.id2label, model.config.label2id = label_maps(labels)


def record_labels(setup: Setup, model: nn.Module) -> list | None:
    """The loaded task's labels, named on the base model's config and on every user of a ColaModel
    (saved with its adapters); what `colaft train` writes to run.json as "labels"."""
    setup.labels = task_labels(setup)
    name_labels(setup.base, setup.labels)
    if isinstance(model, ColaModel) and setup.labels is not None:
        for user in model.users:
            model.labels[user] = setup.labels
    return setup.labels


def train_batches(setup: Setup) -> DataLoader:
    """The training split, shuffled by the seed, in the run's batch size."""
    features = setup.task.encode(setup.train, setup.resolved["max_length"])
    return loader(features, setup.task, setup.resolved["batch_size"], shuffle=True, seed=setup.seed)


def eval_batches(setup: Setup, records: list[dict] | None = None, batch_size: int | None = None) -> list[dict]:
    """`records` (default: the held-out split) in evaluation order; batches twice the run's size by default."""
    features = setup.task.encode(setup.held_out if records is None else records, setup.resolved["max_length"])
    return list(loader(features, setup.task, batch_size or 2 * setup.resolved["batch_size"], shuffle=False))


# ------------------------------------------------------------------ saved runs
def read_run(folder: Path) -> dict:
    """run.json of a run folder, or a clear error."""
    if not folder.is_dir():
        raise ValueError(f"run folder {str(folder)!r} does not exist")
    if not (folder / "run.json").is_file():
        raise ValueError(f"{str(folder)!r} has no run.json: not a run folder of colaft train")
    run = json.loads((folder / "run.json").read_text())
    if not {"options", "resolved"} <= run.keys():
        raise ValueError(f"{str(folder / 'run.json')!r} lacks its options: not written by colaft train")
    return run


def reopen(folder: Path, sample: dict | None = None) -> tuple[dict, Setup, nn.Module]:
    """A run folder's run.json, its rebuilt setup (records, split, base model) and the model it
    trained: the base with its saved adapters (ColA), or a backprop baseline's saved model.

    `sample`: a record of the data to be predicted; the base is then built from the labels the
    run saved (and, for images, the sample's size) without reading the training data, which
    runs before run.json named its labels still need."""
    run = read_run(folder)
    setup = plan(run["options"] | {k: run["resolved"][k] for k in RESOLVED if k in run["resolved"]})
    labels = run.get("labels")
    if sample is not None and (labels is not None or setup.task_name == "clm"):
        shaped = [{**sample, "label": label} for label in labels] if labels is not None else [sample]
        setup.base = setup.task.load(setup.resolved["model"], shaped, setup.seed)
    else:
        load(setup)
    model = _saved_model(folder, run, setup)
    setup.labels = labels if labels is not None else task_labels(setup)
    name_labels(setup.base, setup.labels)
    cola_model = getattr(model, "cola_model", model)
    if isinstance(cola_model, ColaModel) and setup.labels is not None:
        for user in cola_model.users:  # runs saved before the adapters carried their labels
            cola_model.labels.setdefault(user, setup.labels)
    return run, setup, model


def _saved_model(folder: Path, run: dict, setup: Setup) -> nn.Module:
    if not (folder / "adapters").is_dir():
        raise ValueError(f"{str(folder)!r} saved no adapters (trained with --no-save-adapters)")
    method = run["options"].get("method", "cola")
    if method == "full":
        from colaft.app.baselines import Backprop
        return Backprop(type(setup.base).from_pretrained(folder / "adapters"))
    if method != "cola":
        import peft

        from colaft.app.baselines import Backprop
        # AdaLoRA's forward with labels needs its trainable adapter (for a loss that evaluation ignores)
        return Backprop(peft.PeftModel.from_pretrained(setup.base, folder / "adapters",
                                                       is_trainable=method == "adalora"))
    cola_model = ColaModel.from_pretrained(setup.base, folder / "adapters")
    # --mode shared: one adapter answers for every user, whose rows still group the metrics
    return loop.OneAdapter(cola_model) if run["options"].get("mode") == "shared" else cola_model


@dataclass
class Adapters:
    """Saved adapters found for `colaft generate`."""

    path: Path
    peft: bool
    """A PEFT adapter folder (else colaft's checkpoint layout)."""
    users: list[str]
    model: str | None = None
    """The base model they were trained on, when the folder says."""
    task: str | None = None
    """The run's task, when known."""

    def pick(self, user: str | None) -> str:
        """`user`, checked; by default the only user."""
        if user is None:
            if len(self.users) > 1:
                raise ValueError(f"{str(self.path)!r} holds {len(self.users)} users' adapters: choose one with "
                                 f"--user ({', '.join(self.users)})")
            return self.users[0]
        if user not in self.users:
            raise ValueError(f"{str(self.path)!r} holds no user {user!r}; its users: {', '.join(self.users)}")
        return user

    def attach(self, base: nn.Module, user: str) -> ColaModel:
        """`base` with the adapters: every saved user (and the mode) from a colaft checkpoint, `user`'s from PEFT."""
        if not self.peft:
            return ColaModel.from_pretrained(base, self.path)
        from colaft.io.peft import PEFT_USERS  # peft: imported only when needed
        names = {u: n for n, u in _read_json(self.path / PEFT_USERS).get("adapters", {}).items()} \
            if (self.path / PEFT_USERS).is_file() else {}
        folder = self.path if names.get(user, "default") == "default" else self.path / names[user]
        return ColaModel.from_peft(base, folder, user=user)


def find_adapters(path: Path) -> Adapters:
    """A run folder, a colaft adapters folder (a run's adapters/) or a PEFT adapter folder, and its users."""
    if not path.exists():
        raise ValueError(f"adapter folder {str(path)!r} does not exist")
    if (path / "run.json").is_file():
        run = read_run(path)
        found = find_adapters(path / "adapters")
        found.model, found.task = run["resolved"].get("model"), run["options"].get("task")
        return found
    if (path / USERS).is_file() or (path / CONFIG).is_file():
        users = [e["user"] for e in _read_json(path / USERS)["users"]] if (path / USERS).is_file() else \
            [_read_json(path / CONFIG).get("user", "default")]
        found = Adapters(path, False, users)
        if (path.parent / "run.json").is_file():  # a run's adapters/ folder: the run names the model
            run = read_run(path.parent)
            found.model, found.task = run["resolved"].get("model"), run["options"].get("task")
        return found
    if (path / "adapter_config.json").is_file():
        from colaft.io.peft import PEFT_USERS
        users = list(_read_json(path / PEFT_USERS)["adapters"].values()) if (path / PEFT_USERS).is_file() \
            else ["default"]
        return Adapters(path, True, users, _read_json(path / "adapter_config.json").get("base_model_name_or_path"))
    raise ValueError(f"{str(path)!r} is not a run folder, a colaft adapters folder or a PEFT adapter folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
