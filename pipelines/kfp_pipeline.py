"""The Kubeflow pipeline: the same stage `run()`s as `dvc repro`, as KFP components with typed artifacts.

Components are lightweight Python components run in the project images (infra/Dockerfile), so
nothing is pip-installed per pod; each body is one call into `pipelines.kfp_tasks`. The whole
params.yaml travels as a pipeline parameter (its text at compile time is the default), so a run is
fully described by its compiled YAML plus the few knobs a user sets in the Kubeflow UI. Placement
(images, node pools, accelerators, PVC, retries) is the compiled profile's `kubeflow:` section.
"""


import json
from pathlib import Path

import yaml

from kfp import compiler, dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.placement import check_placement, place_service_task, place_task

# The decorators' default; every task's image is then set from params (kubeflow.images).
IMAGE = "ghcr.io/cascade-t2i/cascade:0.1.0"
PIPELINE_NAME = "cascade"
DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_pipeline(params: str, profile: str, pipeline_job_id: str) -> str:
    """Open the MLflow parent run that every stage run nests under; returns its id."""
    from pipelines.kfp_tasks import start_pipeline_task

    return start_pipeline_task(params, profile, pipeline_job_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data(params: str, profile: str, data_source: str, parent_run_id: str,
         dataset: Output[Dataset], metrics: Output[Metrics]):
    """Stage `data`: built-in shapes or ingested user data -> shards + manifest."""
    from pipelines.kfp_tasks import data_task

    data_task(params, profile, data_source, parent_run_id, dataset, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset],
             validated: Output[Dataset], report: Output[HTML], metrics: Output[Metrics]):
    """Stage `validate`: accepted + quarantine manifests, GX Data Docs; fails above max_bad_fraction."""
    from pipelines.kfp_tasks import validate_task

    validate_task(params, profile, parent_run_id, dataset, validated, report, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def features(params: str, profile: str, parent_run_id: str, validated: Input[Dataset],
             text_features: Output[Dataset], metrics: Output[Metrics]):
    """Stage `features`: frozen text-encoder embeddings + masks, cached by caption hash."""
    from pipelines.kfp_tasks import features_task

    features_task(params, profile, parent_run_id, validated, text_features, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tokenizer(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
              tokenizers: Output[Model], metrics: Output[Metrics]):
    """Stage `tokenizer`: base + super-res VQGAN (or KL-VAE) training with checkpoint/resume."""
    from pipelines.kfp_tasks import tokenizer_task

    tokenizer_task(params, profile, parent_run_id, dataset, validated, tokenizers, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tokens(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
           text_features: Input[Dataset], tokenizers: Input[Model], image_tokens: Output[Dataset],
           metrics: Output[Metrics]):
    """Stage `tokens`: every accepted image encoded once by both tokenizers (content-addressed)."""
    from pipelines.kfp_tasks import tokens_task

    tokens_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def base(params: str, profile: str, parent_run_id: str, validated: Input[Dataset], text_features: Input[Dataset],
         tokenizers: Input[Model], image_tokens: Input[Dataset], base_model: Output[Model],
         samples: Output[Markdown], metrics: Output[Metrics]):
    """Stage `base`: Muse base masked transformer from precomputed tokens + text features."""
    from pipelines.kfp_tasks import base_task

    base_task(params, profile, parent_run_id, validated, text_features, tokenizers, image_tokens, base_model,
              samples, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def base_first_phase(params: str, profile: str, parent_run_id: str, phase: str, validated: Input[Dataset],
                     text_features: Input[Dataset], tokenizers: Input[Model], image_tokens: Input[Dataset],
                     base_model: Output[Model], samples: Output[Markdown], metrics: Output[Metrics]):
    """Stage `base`, diffusion family: the first PixArt-alpha phase (pixel dependencies), from scratch."""
    from pipelines.kfp_tasks import base_task

    base_task(params, profile, parent_run_id, validated, text_features, tokenizers, image_tokens, base_model,
              samples, metrics, phase=phase)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def base_next_phase(params: str, profile: str, parent_run_id: str, phase: str, validated: Input[Dataset],
                    text_features: Input[Dataset], tokenizers: Input[Model], image_tokens: Input[Dataset],
                    init_model: Input[Model], base_model: Output[Model], samples: Output[Markdown],
                    metrics: Output[Metrics]):
    """Stage `base`, diffusion family: a later PixArt-alpha phase, started from the previous phase's weights."""
    from pipelines.kfp_tasks import base_task

    base_task(params, profile, parent_run_id, validated, text_features, tokenizers, image_tokens, base_model,
              samples, metrics, phase=phase, init_model=init_model)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def superres(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
             text_features: Input[Dataset], tokenizers: Input[Model], image_tokens: Input[Dataset],
             base_model: Input[Model], superres_model: Output[Model], samples: Output[Markdown],
             metrics: Output[Metrics]):
    """Stage `superres`: Muse super-res masked transformer or Imagen pixel super-res diffusion; then the
    whole cascade is checked."""
    from pipelines.kfp_tasks import superres_task

    superres_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens,
                  base_model, superres_model, samples, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluator(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
              text_features: Input[Dataset], evaluator_model: Output[Model], metrics: Output[Metrics]):
    """Stage `evaluator`: the domain evaluator (FID features, CLIP score), trained once per dataset."""
    from pipelines.kfp_tasks import evaluator_task

    evaluator_task(params, profile, parent_run_id, dataset, validated, text_features, evaluator_model, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def decoder_ft(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
               text_features: Input[Dataset], tokenizers: Input[Model], image_tokens: Input[Dataset],
               base_model: Input[Model], superres_model: Input[Model], evaluator_model: Input[Model],
               decoder: Output[Model], report: Output[Markdown], metrics: Output[Metrics]):
    """Stage `decoder_ft`: a larger decoder on the frozen codes (super-res VQGAN or, diffusion family, base KL-VAE)."""
    from pipelines.kfp_tasks import decoder_ft_task

    decoder_ft_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens,
                    base_model, superres_model, evaluator_model, decoder, report, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: str, profile: str, parent_run_id: str, dataset: Input[Dataset], validated: Input[Dataset],
             text_features: Input[Dataset], tokenizers: Input[Model], base_model: Input[Model],
             superres_model: Input[Model], decoder: Input[Model], evaluator_model: Input[Model],
             evaluation: Output[Dataset], report: Output[HTML], summary: Output[Markdown], metrics: Output[Metrics]):
    """Stage `evaluate`: FID vs CLIP over the guidance sweep, exact checker, prompt suites; HTML report."""
    from pipelines.kfp_tasks import evaluate_task

    evaluate_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, base_model,
                  superres_model, decoder, evaluator_model, evaluation, report, summary, metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(params: str, profile: str, parent_run_id: str, model_name: str, max_fid: str, min_clip_score: str,
             min_checker_single: str, promotion_margin: str, validated: Input[Dataset],
             tokenizers: Input[Model], base_model: Input[Model], superres_model: Input[Model],
             decoder: Input[Model], evaluation: Input[Dataset], registration: Output[Markdown],
             metrics: Output[Metrics]):
    """Stage `register`: the cascade as one MLflow pyfunc model; alias champion only if the gates pass."""
    from pipelines.kfp_tasks import register_task

    gates = dict(max_fid=max_fid, min_clip_score=min_clip_score, min_checker_single=min_checker_single,
                 margin=promotion_margin)
    register_task(params, profile, parent_run_id, model_name, validated, tokenizers, base_model, superres_model,
                  decoder, evaluation, registration, metrics, gates)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_pipeline(params: str, profile: str, pipeline_job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the MLflow parent run as FINISHED or FAILED with the failing task's reason."""
    from pipelines.kfp_tasks import finish_pipeline_task

    finish_pipeline_task(params, profile, pipeline_job_id, status.state, status.error_message)


def build_pipeline(params_text: str, profile: str | None = None, cluster: bool = True):
    """The pipeline function, with `params_text` (a params.yaml) as the default of `params` and
    the placement of `profile` (default: the params' own `profile:`). `cluster=False` leaves the
    placement out (kfp.local would apply its environment: the in-cluster MLflow URI, the claim's
    mount path)."""
    from components.config import load_config

    cfg = load_config(text=params_text, profile=profile)
    check_placement(cfg)
    kf = cfg.kubeflow

    @dsl.pipeline(name=PIPELINE_NAME, description="Cascaded text-to-image training: data -> validate -> features -> evaluator, tokenizer -> tokens -> base -> superres -> decoder_ft -> evaluate -> register.")
    def cascade_pipeline(
        profile: str = cfg.profile,
        data_source: str = "",
        model_name: str = "",
        # Promotion gates; "" keeps the profile's value from params (register.gates), "none" turns
        # the checker gate off. Strings, because a float parameter cannot say "the profile's".
        max_fid: str = "",
        min_clip_score: str = "",
        min_checker_single: str = "",
        promotion_margin: str = "",
        params: str = params_text,
    ):
        # The exit task may not depend on other tasks, so the parent run is found by the job id.
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = finish_pipeline(params=params, profile=profile, pipeline_job_id=job_id)
        if cluster:
            place_service_task(finish, kf)
        with dsl.ExitHandler(finish):
            start = start_pipeline(params=params, profile=profile, pipeline_job_id=job_id)
            start.set_caching_options(False)  # a new parent run per pipeline run
            if cluster:
                place_service_task(start, kf)
            common = dict(params=params, profile=profile, parent_run_id=start.output)
            data_step = data(data_source=data_source, **common)
            validate_step = validate(dataset=data_step.outputs["dataset"], **common)
            features_step = features(validated=validate_step.outputs["validated"], **common)
            tokenizer_step = tokenizer(dataset=data_step.outputs["dataset"], validated=validate_step.outputs["validated"],
                                       **common)
            tokens_step = tokens(dataset=data_step.outputs["dataset"], validated=validate_step.outputs["validated"],
                                 text_features=features_step.outputs["text_features"],
                                 tokenizers=tokenizer_step.outputs["tokenizers"], **common)
            trained = dict(validated=validate_step.outputs["validated"],
                           text_features=features_step.outputs["text_features"],
                           tokenizers=tokenizer_step.outputs["tokenizers"],
                           image_tokens=tokens_step.outputs["image_tokens"])
            evaluator_step = evaluator(dataset=data_step.outputs["dataset"],
                                       validated=validate_step.outputs["validated"],
                                       text_features=features_step.outputs["text_features"], **common)
            base_tasks = base_steps(cfg, trained, common)  # one task, or one per PixArt phase
            base_step = base_tasks[-1]
            superres_step = superres(dataset=data_step.outputs["dataset"], base_model=base_step.outputs["base_model"],
                                     **trained, **common)
            cascade_parts = dict(validated=validate_step.outputs["validated"],
                                 text_features=features_step.outputs["text_features"],
                                 tokenizers=tokenizer_step.outputs["tokenizers"],
                                 base_model=base_step.outputs["base_model"],
                                 superres_model=superres_step.outputs["superres_model"],
                                 evaluator_model=evaluator_step.outputs["evaluator_model"],
                                 dataset=data_step.outputs["dataset"])
            decoder_step = decoder_ft(image_tokens=tokens_step.outputs["image_tokens"], **cascade_parts, **common)
            evaluate_step = evaluate(decoder=decoder_step.outputs["decoder"], **cascade_parts, **common)
            register_step = register(model_name=model_name, max_fid=max_fid, min_clip_score=min_clip_score,
                                     min_checker_single=min_checker_single, promotion_margin=promotion_margin,
                                     validated=validate_step.outputs["validated"],
                                     tokenizers=tokenizer_step.outputs["tokenizers"],
                                     base_model=base_step.outputs["base_model"],
                                     superres_model=superres_step.outputs["superres_model"],
                                     decoder=decoder_step.outputs["decoder"],
                                     evaluation=evaluate_step.outputs["evaluation"], **common)
            register_step.set_caching_options(False)  # every run registers (and gates) a version
            if cluster:
                steps = dict(data=data_step, validate=validate_step, features=features_step,
                             evaluator=evaluator_step, tokenizer=tokenizer_step, tokens=tokens_step, base=base_step,
                             superres=superres_step, decoder_ft=decoder_step, evaluate=evaluate_step,
                             register=register_step)
                for stage, task in steps.items():
                    place_task(task, stage, kf)
                for task in base_tasks[:-1]:  # the earlier PixArt phases run where base runs
                    place_task(task, "base", kf)

    return cascade_pipeline


def base_steps(cfg, trained: dict, common: dict) -> list:
    """The base stage's tasks: one (masked family), or one per PixArt-alpha phase (diffusion family),
    each started from the previous phase's weights and shown as base-<phase> in the DAG."""
    if cfg.generator.family != "diffusion":
        return [base(**trained, **common)]
    tasks = []
    for phase in cfg.diffusion.base.phases:
        if tasks:
            task = base_next_phase(phase=phase.name, init_model=tasks[-1].outputs["base_model"], **trained, **common)
        else:
            task = base_first_phase(phase=phase.name, **trained, **common)
        tasks.append(task.set_display_name(f"base-{phase.name}"))
    return tasks


def params_default(params_path=None) -> str:
    """params.yaml as one line of JSON (JSON is YAML): KFP copies defaults into a comment header
    of the compiled file, and a multi-line default there makes the file unparseable."""
    tree = yaml.safe_load(Path(params_path or DEFAULT_PARAMS).read_text())
    return json.dumps(tree, separators=(",", ":"))


def compile_pipeline(output, params_path=None, profile: str | None = None) -> Path:
    """Write the pipeline YAML for `profile`'s placement (default: params.yaml's `profile:`)."""
    params_text = params_default(params_path)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params_text, profile), str(output))
    return output
