"""Reproduce a recorded run: rebuild its training and validation sets from the lake as it was, check them against
the recorded hashes, retrain with the recorded spec and compare the new metrics with the recorded intervals.

What a run records (``recorded_inputs``, in its ``model_runs`` row): the train/val file digests, the last price date
the dataset saw (``prices_through``) and the split's cutoff, the DatasetSpec and SplitSpec, the AdapterSpec (its seed
included), a digest of the base model's safetensors and the code version; beside its evaluation, one line per
sample (id, family, tickers, as-of and a digest of each field: ``evaluation/inputs.jsonl.gz``), so a rebuild that
differs names the first differing sample and the field, even after the lake's split files were replaced.

``reproduce`` never writes into the lake's datasets, the recorded adapter or the champion: it works in a scratch
folder of its own (``<lake>/models/reproductions/<run>-<stamp>``) and removes only that folder.
No Dagster here: the CLI (``finpipe reproduce``) and tests call it directly.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from finpipe.models.files import read_json_or_empty

#: per-sample digests of the run's train and val sets, in the adapter's evaluation folder
INPUTS_FILE = "inputs.jsonl.gz"
SAMPLE_FIELDS = ("family", "tickers", "as_of", "messages", "expected", "labels", "facts", "origin")
#: exit codes of `finpipe reproduce` (beside finpipe's own: 2 an unknown run or one recorded without what this needs)
EXIT_OK, EXIT_DATA_DIFFERS, EXIT_METRICS_DIFFER = 0, 6, 7


class CannotReproduce(ValueError):
    """The run is unknown, or was recorded without what reproducing it needs."""


def base_model_sha256(base_dir: str | Path) -> str:
    """One digest over the base model's safetensors files (name and content), in name order."""
    from finpipe.models.files import file_digest

    digest = hashlib.sha256()
    for weights in sorted(Path(base_dir).glob("*.safetensors")):
        digest.update(f"{weights.name}:{file_digest(weights)}\n".encode())
    return digest.hexdigest()


def _field_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def sample_digests(samples) -> list[dict]:
    return [{"id": s.id, "family": s.family, "tickers": list(s.tickers), "as_of": s.as_of,
             "fields": {f: _field_digest(getattr(s, f)) for f in SAMPLE_FIELDS}} for s in samples]


def recorded_inputs(lake_dir: Path, training_report: dict, base_dir: str | Path, adapter_dir: str | Path | None = None,
                    train=None, val=None) -> dict:
    """The ``model_runs`` columns reproduction needs (and, given the samples and the adapter folder, the per-sample
    digests beside the evaluation). Missing manifests give None columns, never an error: the row is still recorded."""
    from finpipe.paths import DatasetFiles
    from finpipe.tracking import code_version

    files = DatasetFiles.of(lake_dir)
    split = read_json_or_empty(files.split_manifest)
    samples = read_json_or_empty(files.samples_manifest)
    side = lambda name: ((split.get("files") or {}).get(name) or {}).get("sha256")  # noqa: E731
    if adapter_dir is not None and train is not None and val is not None:
        from finpipe.evaluation.challenger import evaluation_dir

        out = evaluation_dir(adapter_dir) / INPUTS_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(out, "wt", encoding="utf-8") as f:
            for name, rows in (("train", train), ("val", val)):
                for row in sample_digests(rows):
                    f.write(json.dumps({"side": name, **row}, sort_keys=True) + "\n")
    return {
        "train_sha256": side("train"), "val_sha256": side("val"),
        "prices_through": samples.get("prices_through"),
        "dataset_spec_json": json.dumps({"spec": samples.get("spec"),
                                         "external_path": (samples.get("config") or {}).get("external_path", "")},
                                        sort_keys=True) if samples.get("spec") else None,
        "split_spec_json": json.dumps({"spec": split.get("spec"), "cutoff": split.get("cutoff"),
                                       "holdout_sha256": split.get("holdout_sha256")}, sort_keys=True)
        if split.get("spec") else None,
        "adapter_spec_json": json.dumps({"spec": training_report.get("spec"),
                                         "warm_start": training_report.get("warm_start"),
                                         "init_tokens": (training_report.get("cumulative_train_tokens") or 0)
                                         - (training_report.get("train_tokens") or 0),
                                         "steps": training_report.get("steps"),
                                         # the clock's decisions, replayed by a reproduction (ScheduleReplay)
                                         "lr_factors": training_report.get("lr_factors") or None,
                                         "eval_losses": training_report.get("eval_losses") or None},
                                        sort_keys=True),
        "base_model_sha256": base_model_sha256(base_dir),
        "code_version": code_version(),
    }


# ------------------------------------------------------------------------------------------------- reproduce

@dataclass
class ReproReport:
    run_id: str
    data_identical: bool = False
    hashes: dict = field(default_factory=dict)  # side -> {recorded, rebuilt, samples}
    first_difference: dict | None = None  # {side, index, id, family, tickers, as_of, fields, ...}
    reason: str | None = None
    metrics: list[dict] = field(default_factory=list)  # {metric, recorded, low, high, reproduced, within}
    weights: dict | None = None  # {bit_identical, max_abs_diff, tensors}
    notes: list[str] = field(default_factory=list)
    trained: bool = False
    seconds: float = 0.0

    @property
    def metrics_within(self) -> bool:
        return bool(self.metrics) and all(m["within"] for m in self.metrics)

    @property
    def verdict(self) -> str:
        if not self.data_identical:
            return "data differs: " + (self.reason or "the rebuilt sets do not match the recorded hashes")
        if not self.trained:
            return "identical data (training skipped)"
        if self.metrics_within:
            return "identical data, metrics within interval"
        outside = [m["metric"] for m in self.metrics if not m["within"]]
        return f"identical data, metrics outside their interval: {', '.join(outside)}"

    @property
    def exit_code(self) -> int:
        if not self.data_identical:
            return EXIT_DATA_DIFFERS
        return EXIT_OK if not self.trained or self.metrics_within else EXIT_METRICS_DIFFER

    def as_dict(self) -> dict:
        return asdict(self) | {"verdict": self.verdict, "exit_code": self.exit_code}


def resolve_run_id(lake_dir: Path, which: str) -> str:
    from finpipe.models import registry

    if which in ("champion", "latest"):
        return registry.resolve_adapter(lake_dir, which)["run_id"]
    return which


def reproduce(lake_dir: Path, which: str, skip_training: bool = False, log: Callable[[str], None] = print,
              keep: bool = False) -> ReproReport:
    """Rebuild run ``which`` (a run id, ``champion`` or ``latest``) and compare: see the module's doc."""
    from finpipe.market.lake import PriceLake
    from finpipe.models import registry
    from finpipe.paths import LAKE_DB_NAME

    started = time.monotonic()
    lake_dir = Path(lake_dir)
    run_id = resolve_run_id(lake_dir, which)
    lake = PriceLake(lake_dir / LAKE_DB_NAME)
    row = registry.RunRegistry(lake).get(run_id)
    if row is None:
        raise CannotReproduce(f"no run {run_id!r} in model_runs (see `finpipe runs`)")
    missing = [c for c in ("train_sha256", "val_sha256", "prices_through", "dataset_spec_json", "split_spec_json",
                           "adapter_spec_json") if row.get(c) is None]
    if missing:
        raise CannotReproduce(f"run {run_id} was recorded without {', '.join(missing)} (by a finpipe older than "
                              "`finpipe reproduce`): it cannot be rebuilt")
    report = ReproReport(run_id=run_id)
    adapter_dir = Path(row["adapter_path"])
    evaluation = read_json_or_empty(adapter_dir / "evaluation" / "evaluation.json")
    base_dir = (evaluation.get("base") or {}).get("path") or registry.read_pointer(registry.base_pointer(lake_dir))["path"]
    if row.get("base_model_sha256") and base_model_sha256(base_dir) != row["base_model_sha256"]:
        report.notes.append(f"the base model at {base_dir} is not the one the run trained on (its safetensors digest "
                            "differs): metrics may differ")
    from finpipe.tracking import code_version

    if row.get("code_version") and row["code_version"] != (now := code_version()):
        report.notes.append(f"code version: recorded {row['code_version']}, now {now}")

    scratch = registry.models_dir(lake_dir) / "reproductions" / f"{run_id}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
    scratch.mkdir(parents=True)
    try:
        train, val, golden = _rebuild(lake, lake_dir, row, report, scratch, log)
        if report.data_identical and not skip_training:
            _retrain_and_compare(row, report, evaluation, base_dir, adapter_dir, train, val, golden, scratch, log)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _rebuild(lake, lake_dir: Path, row: dict, report: ReproReport, scratch: Path, log):
    """The run's train and val sets rebuilt from the lake's prices up to the recorded date; hashes compared."""
    from finpipe.evaluation.golden import golden_hash
    from finpipe.instructions.builder import DatasetSpec, build_samples
    from finpipe.instructions.samples import read_jsonl, write_jsonl
    from finpipe.instructions.split import SplitSpec, temporal_split
    from finpipe.models.files import file_digest
    from finpipe.paths import DatasetFiles
    from finpipe.statistics.compute import STATISTICS_COLUMNS, compute_statistics

    through = row["prices_through"]
    dataset, split_rec = json.loads(row["dataset_spec_json"]), json.loads(row["split_spec_json"])
    prices = lake.query("SELECT ticker, date, open, high, low, close, adj_close, volume FROM prices WHERE date <= ? "
                        "ORDER BY ticker, date", [through])
    newer = lake.query("SELECT count(*) AS n FROM prices WHERE date > ?", [through])["n"][0]
    log(f"rebuilding from {prices.height} price rows up to {through}" + (f" ({newer} newer rows left out)" if newer else ""))
    universe_of = dict(lake.query("SELECT ticker, universe FROM instruments").iter_rows())
    names = dict(lake.query("SELECT ticker, name FROM instruments").iter_rows())
    stats = compute_statistics(prices.select("ticker", "date", "close", "adj_close", "volume"),
                               universe_of).select(STATISTICS_COLUMNS)
    spec = DatasetSpec(**(dataset["spec"] | {"families": tuple(dataset["spec"]["families"])}))
    golden_path = DatasetFiles.of(lake_dir).golden
    golden = read_jsonl(golden_path) if golden_path.exists() else []
    if row.get("golden_hash") and golden_hash(golden) != row["golden_hash"]:
        report.notes.append(f"the golden set at {golden_path} is not the one the run was evaluated on "
                            f"(hash {golden_hash(golden)}, recorded {row['golden_hash']})")
    holdout = []
    if split_rec.get("holdout_sha256"):
        if not golden_path.exists() or file_digest(golden_path) != split_rec["holdout_sha256"]:
            report.notes.append("the golden set held out of the run's split is not in the lake any more")
        holdout = golden
    split_spec = SplitSpec(**(split_rec["spec"] | {"cutoff": dt.date.fromisoformat(split_rec["spec"]["cutoff"])
                                                   if split_rec["spec"].get("cutoff") else None}))

    def build(statistics, folder: Path) -> tuple:
        samples = build_samples(statistics, prices, names, spec)
        if dataset.get("external_path"):
            from finpipe.instructions.external import load_external

            samples += load_external(dataset["external_path"])
        split = temporal_split(samples, split_spec, holdout=holdout)
        hashes = {}
        for side, rows in (("train", split.train), ("val", split.val)):
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(rows, folder / f"{side}.jsonl")
            rebuilt, recorded = file_digest(folder / f"{side}.jsonl"), row[f"{side}_sha256"]
            hashes[side] = {"recorded": recorded, "rebuilt": rebuilt, "samples": len(rows),
                            "identical": rebuilt == recorded}
        return split, hashes

    split, hashes = build(stats, scratch)
    if not all(h["identical"] for h in hashes.values()):
        # the run's samples were rendered from the lake's statistics table, refreshed incrementally: equal to a full
        # recompute within 1e-9, which a rounding boundary can tell apart. The table's rows up to the date, if they
        # still give the recorded bytes, are the lake as it was.
        tables = lake.query("SELECT table_name FROM information_schema.tables")["table_name"].to_list()
        if "price_statistics" in tables:
            stored = lake.query("SELECT * FROM price_statistics WHERE date <= ?", [through]).select(STATISTICS_COLUMNS)
            other, other_hashes = build(stored, scratch / "from-table")
            if all(h["identical"] for h in other_hashes.values()):
                report.notes.append("rebuilt from the lake's price_statistics table: a full recompute of the "
                                    "statistics renders some samples differently (last-digit differences of the "
                                    "incremental refresh)")
                split, hashes = other, other_hashes
                for side in ("train", "val"):
                    (scratch / "from-table" / f"{side}.jsonl").replace(scratch / f"{side}.jsonl")
    report.hashes = hashes
    report.data_identical = identical = all(h["identical"] for h in hashes.values())
    if split_rec.get("cutoff") and split.cutoff.isoformat() != split_rec["cutoff"]:
        report.notes.append(f"the rebuilt cutoff is {split.cutoff}, recorded {split_rec['cutoff']}")
    if not identical:
        report.first_difference = _first_difference(Path(row["adapter_path"]), split.train, split.val, report)
        report.reason = _reason(lake, row, report.first_difference)
    return split.train, split.val, golden


def _first_difference(adapter_dir: Path, train, val, report: ReproReport) -> dict | None:
    from finpipe.evaluation.challenger import evaluation_dir

    path = evaluation_dir(adapter_dir) / INPUTS_FILE
    if not path.exists():
        return None
    recorded = {"train": [], "val": []}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            recorded[item.pop("side")].append(item)
    for side, rows in (("train", train), ("val", val)):
        if report.hashes[side]["identical"]:
            continue
        found = _first_changed(recorded[side], sample_digests(rows))
        if found:
            return {"side": side, **found}
    return None


def _key(item: dict) -> tuple:
    """What a sample is about, whatever its text: its family, tickers and date (undated ones: the id)."""
    return (item["family"], tuple(item["tickers"]), item["as_of"] or item["id"])


def _first_changed(recorded: list[dict], rebuilt: list[dict]) -> dict | None:
    """The first recorded sample (in file order) that the rebuild lacks or renders differently, or else the first
    new one. Samples are matched by what they are about, not by position: a changed text reorders a date's samples
    (they are sorted by id, a digest of the text)."""
    def keyed(items):
        seen: dict[tuple, int] = {}
        out = {}
        for index, item in enumerate(items):
            key = _key(item)
            seen[key] = seen.get(key, 0) + 1
            out[(key, seen[key])] = (index, item)
        return out

    was, now = keyed(recorded), keyed(rebuilt)
    describe = lambda index, item: {"index": index, "id": item["id"], "family": item["family"],  # noqa: E731
                                    "tickers": item["tickers"], "as_of": item["as_of"]}
    for key, (index, item) in sorted(was.items(), key=lambda kv: kv[1][0]):
        if key not in now:
            return describe(index, item) | {"fields": [], "note": "missing from the rebuild"}
        _, other = now[key]
        fields = [f for f in SAMPLE_FIELDS if item["fields"].get(f) != other["fields"].get(f)]
        if fields:
            return describe(index, item) | {"fields": fields, "rebuilt_id": other["id"],
                                            "rebuilt_index": now[key][0]}
    extra = sorted((index, item) for key, (index, item) in now.items() if key not in was)
    if extra:
        return describe(*extra[0]) | {"fields": [], "note": "new in the rebuild"}
    return None


def _reason(lake, row: dict, difference: dict | None) -> str:
    """Why the rebuild differs: price rows written after the run (the first, for the differing sample's tickers and
    dates when there is one), else the code or the spec."""
    created = row["created_at"]
    changed = lake.query("SELECT ticker, date, ingested_at FROM prices WHERE date <= ? AND ingested_at > ? "
                         "ORDER BY date, ticker", [row["prices_through"], created])
    where = ""
    if difference:
        where = (f"first differing {difference['side']} sample #{difference['index']} {difference['id']} "
                 f"({difference['family']}, {'/'.join(difference['tickers'])}, as of {difference['as_of']})"
                 + (f": {', '.join(difference['fields'])} differ" if difference["fields"] else "")
                 + (f" ({difference['note']})" if difference.get("note") else "") + "; ")
    if changed.height:
        if difference:
            mine = changed.filter(changed["ticker"].is_in(difference["tickers"]))
            changed = mine if mine.height else changed
        first = changed.row(0, named=True)
        return (f"{where}{changed.height} price row(s) up to {row['prices_through']} were written after the run "
                f"(first: {first['ticker']} {first['date']}, ingested {first['ingested_at']:%Y-%m-%d %H:%M:%S})")
    if difference is None:
        return (f"no sample differs in what it says (or the run's per-sample digests, {INPUTS_FILE}, are missing): "
                "the files differ in order or serialization")
    return (f"{where}no price row changed after the run: the code (recorded {row.get('code_version')}) or a library "
            "builds these samples differently now")


def _retrain_and_compare(row: dict, report: ReproReport, evaluation: dict, base_dir: str, adapter_dir: Path,
                         train, val, golden, scratch: Path, log) -> None:
    from finpipe.evaluation.evaluate import HEADLINE_METRICS, EvalSpec, evaluate_model
    from finpipe.training.budget import ScheduleReplay
    from finpipe.training.sft import train_adapter
    from finpipe.training.spec import AdapterSpec

    recorded = json.loads(row["adapter_spec_json"])
    spec = AdapterSpec(**recorded["spec"])
    schedule = None
    if spec.max_minutes > 0 and recorded.get("steps"):
        schedule = ScheduleReplay.of(recorded)
        if schedule is not None and spec.processes == 1:  # the clock's decisions replayed: the same training
            report.notes.append(
                f"the run was budgeted by time ({spec.max_minutes} min): its {schedule.steps} steps, the learning "
                f"rate of each and its evaluations at steps {sorted(schedule.eval_steps)} are replayed, so on the "
                "same machine and library versions the weights can be bit-identical")
        else:  # recorded before finpipe kept the schedule, or on several ranks: its step count only
            schedule = None
            report.notes.append(
                f"the run was budgeted by time ({spec.max_minutes} min, {recorded['steps']} steps on its machine) "
                "and its learning-rate schedule was not recorded (or it trained on several ranks): retrained for "
                "its steps with the schedule following steps instead of the clock, so the weights are not expected "
                "to be bit-identical; the metrics' intervals are the check")
            spec = replace(spec, max_minutes=0.0, max_steps=int(recorded["steps"]))
    init_adapter = recorded.get("warm_start")
    if init_adapter and not Path(init_adapter).exists():
        report.notes.append(f"the run warm-started from {init_adapter}, which is gone: retrained from scratch")
        init_adapter = None
    new_dir = scratch / "adapter"
    log(f"retraining {row['run_id']} with its recorded spec (seed {spec.seed})")
    if spec.processes > 1:
        from finpipe.training.launch import train_in_processes

        train_in_processes(base_dir, scratch / "train.jsonl", scratch / "val.jsonl", scratch / "job", new_dir, spec,
                           log=log, init_adapter=init_adapter, init_tokens=recorded.get("init_tokens") or 0)
    else:
        train_adapter(base_dir, train, val, scratch / "job", new_dir, spec, log=log, init_adapter=init_adapter,
                      init_tokens=recorded.get("init_tokens") or 0, schedule=schedule)
    report.trained = True
    report.weights = compare_weights(adapter_dir, new_dir)
    if not evaluation:
        report.notes.append(f"no evaluation.json in {adapter_dir / 'evaluation'}: no recorded intervals to compare")
        return
    eval_spec = EvalSpec(**evaluation["spec"])
    scores = evaluate_model("reproduction", base_dir, str(new_dir), [], golden, eval_spec, log, with_val=False,
                            with_forgetting=False).as_dict()
    was = evaluation["variants"]["adapter"]["golden"]
    for metric in HEADLINE_METRICS:
        value, before = scores["golden"]["overall"].get(metric), was["overall"].get(metric)
        if value is None and before is None:
            continue
        low, high = (was.get("ci") or {}).get(metric) or (before, before)
        within = value is not None and low is not None and low - 1e-9 <= value <= high + 1e-9
        report.metrics.append({"metric": metric, "recorded": before, "low": low, "high": high, "reproduced": value,
                               "within": within})
    report.metrics.append({"metric": "golden_loss (no interval: shown, not judged)", "recorded": was.get("loss"),
                           "low": None, "high": None, "reproduced": scores["golden"].get("loss"), "within": True})


def compare_weights(recorded_dir: Path, new_dir: Path) -> dict:
    """Bit-identical, or the largest absolute difference, over the adapters' tensors."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors"
    if not (recorded_dir / name).exists() or not (new_dir / name).exists():
        return {"bit_identical": False, "max_abs_diff": None, "tensors": 0, "note": f"no {name} to compare"}
    a, b = load_file(recorded_dir / name), load_file(new_dir / name)
    if set(a) != set(b):
        return {"bit_identical": False, "max_abs_diff": None, "tensors": len(a), "note": "different tensor names"}
    identical, worst = True, 0.0
    for key in a:
        if a[key].shape != b[key].shape:
            return {"bit_identical": False, "max_abs_diff": None, "tensors": len(a), "note": f"{key}: shapes differ"}
        identical &= a[key].dtype == b[key].dtype and bool(a[key].view(-1).eq(b[key].view(-1)).all())
        worst = max(worst, float((a[key].float() - b[key].float()).abs().max()) if a[key].numel() else 0.0)
    return {"bit_identical": identical, "max_abs_diff": worst, "tensors": len(a)}


def render(report: ReproReport) -> str:
    """The CLI's text: the data hash check, the metric comparison, bit identity, the time."""
    lines = [f"reproduce {report.run_id}"]
    for side, h in report.hashes.items():
        lines.append(f"  {side:5s} {'identical' if h['identical'] else 'DIFFERS  '} rebuilt {h['rebuilt'][:16]} "
                     f"recorded {(h['recorded'] or '')[:16]} ({h['samples']} samples)")
    if report.first_difference:
        d = report.first_difference
        lines.append(f"  first differing sample: {d['side']} #{d['index']} {d['id']} {d['family']} "
                     f"{'/'.join(d['tickers'])} as of {d['as_of']}"
                     + (f", fields: {', '.join(d['fields'])}" if d["fields"] else "")
                     + (f" ({d['note']})" if d.get("note") else ""))
    for m in report.metrics:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        interval = f"[{fmt(m['low'])}, {fmt(m['high'])}]" if m["low"] is not None else ""
        lines.append(f"  {m['metric']}: reproduced {fmt(m['reproduced'])}, recorded {fmt(m['recorded'])} {interval}"
                     + ("" if m["within"] else "  OUTSIDE"))
    if report.weights:
        w = report.weights
        lines.append("  weights: " + ("bit-identical" if w["bit_identical"] else
                                      f"not bit-identical (max abs difference {w['max_abs_diff']})")
                     + f" over {w['tensors']} tensors" + (f" ({w['note']})" if w.get("note") else ""))
    lines += [f"  note: {n}" for n in report.notes]
    lines.append(f"{report.verdict} ({report.seconds:.1f} s)")
    return "\n".join(lines)
