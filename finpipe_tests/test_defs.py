"""The code location, as Dagster loads it: every asset, group, check, job, schedule and sensor, literally. An asset
that falls out of the autoloaded ``finpipe/defs`` (or one nobody meant to add) fails here, in under a second."""

import dagster as dg

from finpipe.definitions import defs, in_groups
from finpipe.instructions.quality import GATES

GROUPS = {
    "daily_prices": "market_data",
    "price_statistics": "statistics",
    "instruction_samples": "datasets", "dataset_split": "datasets",
    "base_model": "models", "qlora_adapter": "models",
    "scratch_gpt": "scratch",
    "adapter_evaluation": "evaluation", "evaluation_report": "evaluation", "champion_adapter": "evaluation",
    "peft_method_run": "studies", "peft_comparison": "studies", "compression_study": "studies",
}
CHECKS = {
    "daily_prices": {"prices_keys_unique", "prices_ohlc_consistent", "prices_no_calendar_gaps", "prices_fresh"},
    "price_statistics": {"statistics_sane"},
    "instruction_samples": {f"samples_{gate}" for gate in GATES},
    "dataset_split": {"split_has_no_leakage"},
    "adapter_evaluation": {"adapter_beats_base_on_val_loss", "adapter_keeps_general_skills",
                           "no_golden_regression_vs_champion"},
}
# data gates block what is built on bad data; the model checks only inform: promotion applies the same rules, and a
# refused challenger (one that forgets general skills, say) ends a nightly run with the champion kept, not failed
BLOCKING = {"prices_keys_unique", "prices_no_calendar_gaps", "prices_ohlc_consistent", "statistics_sane",
            "split_has_no_leakage"} | {f"samples_{gate}" for gate in GATES}


def test_the_code_location_holds_exactly_the_documented_definitions():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()} == GROUPS
    checks: dict[str, set[str]] = {}
    for key in graph.asset_check_keys:
        checks.setdefault(key.asset_key.to_user_string(), set()).add(key.name)
    assert checks == CHECKS
    assert {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking} == BLOCKING
    # the named jobs `finpipe run` launches, one per stage of the lineage, and the nightly one
    assert {j.name for j in defs.jobs} == {"nightly_retrain", "ingest_prices", "build_datasets",
                                           "pretrain_scratch_gpt", "train_evaluate_promote"}
    assert {s.name for s in defs.schedules} == {"nightly_schedule"}
    assert {s.name for s in defs.sensors} == {"refresh_on_new_prices", "snapshot_lake_after_success", "retrain_on_drift"}
    assert set(defs.resources) == {"lake", "market_data", "huggingface", "tracking"}
    assert defs.executor.name == "multiprocess_lake_safe"
    repository = defs.get_repository_def()  # binds resources and jobs: fails on any missing resource
    assert repository.get_job("nightly_retrain")
    stage = {node.name for node in repository.get_job("train_evaluate_promote").nodes_in_topological_order}
    assert {"base_model", "qlora_adapter", "adapter_evaluation", "evaluation_report", "champion_adapter",
            "adapter_evaluation_adapter_beats_base_on_val_loss"} <= stage  # its blocking checks run in it
    assert repository.get_job("train_evaluate_promote").executor_def.name == "multiprocess_lake_safe"


def test_a_stage_is_its_groups_assets_and_their_checks():
    stage = in_groups("market_data")
    assets = [d for d in stage if not isinstance(d, dg.AssetChecksDefinition)]
    assert {a.key.to_user_string() for a in assets} == {"daily_prices"}
    assert len(stage) - len(assets) == len(CHECKS["daily_prices"])
    models = {k.to_user_string() for d in in_groups("models", "evaluation")
              if not isinstance(d, dg.AssetChecksDefinition) for k in d.keys}
    assert models == {"base_model", "qlora_adapter", "adapter_evaluation", "evaluation_report", "champion_adapter"}


def test_every_shipped_run_config_is_valid_for_the_launchpad_and_the_cli():
    """configs/*.yaml: each op's config passes its asset's own config schema (what the Launchpad checks), and the
    CLI's reader accepts it."""
    from dagster._config import process_config

    from finpipe.cli.run import _config_ops
    from finpipe.paths import REPO_ROOT

    assets = {a.key.to_user_string(): a for a in defs.assets}
    files = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"quickstart", "train-60-minutes", "nightly", "gpu-qlora"}
    for path in files:
        for op, section in _config_ops(str(path)).items():
            schema = assets[op].op.config_schema.config_type
            result = process_config(schema, section.get("config", {}))
            assert result.success, (path.name, op, [e.message for e in result.errors])
    bad = process_config(assets["qlora_adapter"].op.config_schema.config_type, {"max_minuts": 3})
    assert not bad.success  # a misspelt field is caught, so the check above can fail


def test_every_setting_has_one_default_and_one_help_in_the_config_classes_and_the_cli():
    """Each Dagster config class carries its spec's defaults and help; each CLI option that sets a spec field shows
    that field's help and default (the heal_steps drift, 8 in one place and 16 in another, cannot come back)."""
    import dataclasses

    from finpipe.cli import build_parser
    from finpipe.defs.datasets import DatasetSplitConfig, InstructionSamplesConfig
    from finpipe.defs.evaluation import EvaluationConfig
    from finpipe.defs.models import AdapterTrainingConfig, ScratchGPTConfig
    from finpipe.defs.studies import CompressionConfig, PeftStudyConfig
    from finpipe.evaluation.evaluate import EvalSpec
    from finpipe.instructions.builder import DatasetSpec
    from finpipe.instructions.split import SplitSpec
    from finpipe.models.scratch import ScratchGPTSpec
    from finpipe.settings import help_of
    from finpipe.studies.compression import CompressionSpec
    from finpipe.studies.peft_study import PeftStudySpec
    from finpipe.training.spec import AdapterSpec

    pairs = [(AdapterTrainingConfig, AdapterSpec), (EvaluationConfig, EvalSpec), (CompressionConfig, CompressionSpec),
             (PeftStudyConfig, PeftStudySpec), (InstructionSamplesConfig, DatasetSpec), (DatasetSplitConfig, SplitSpec),
             (ScratchGPTConfig, ScratchGPTSpec)]
    compared = 0
    for config_cls, spec_cls in pairs:
        spec_fields = {f.name: f for f in dataclasses.fields(spec_cls)}
        for name, field in config_cls.model_fields.items():
            if name not in spec_fields:
                continue  # a Dagster-only field (warm_start, the split's paths)
            default = spec_fields[name].default
            # the UI's forms have no tuples or None: a tuple becomes a list, None an empty string ("empty: none")
            shown = list(default) if isinstance(default, tuple) else "" if default is None else default
            assert field.default == shown, (config_cls, name)
            assert field.description.startswith(help_of(spec_cls, name)), (config_cls, name)  # + a format hint
            compared += 1
    assert compared > 60

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    options = {"run": {"--quantization": (AdapterSpec, "quantization"), "--train-minutes": (AdapterSpec, "max_minutes"),
                       "--max-steps": (AdapterSpec, "max_steps"), "--eval-max-new-tokens": (EvalSpec, "max_new_tokens")},
               "study": {"--max-steps": (PeftStudySpec, "max_steps"), "--heal-steps": (CompressionSpec, "heal_steps"),
                         "--drop": (CompressionSpec, "ks")}}
    for command, wanted in options.items():
        actions = {a.option_strings[0]: a for a in sub[command]._actions if a.option_strings}
        for option, (spec_cls, name) in wanted.items():
            default = getattr(spec_cls, name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert actions[option].help.startswith(help_of(spec_cls, name).replace("%", "%%")), (command, option)
            assert actions[option].help.endswith(f"(default: {shown})"), (command, option)
    assert sub["study"]._option_string_actions["--drop"].default == "2,4" == ",".join(map(str, CompressionSpec.ks))
    assert CompressionSpec.heal_steps == CompressionConfig().heal_steps
