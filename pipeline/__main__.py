"""The command line: `python -m pipeline COMMAND [OPTIONS]`.

Every stage command's options are generated from its config dataclass (`pipeline.config`),
with the defaults read from `params.yaml` (or `--params FILE`, given before the command)
and shown by `--help`. Options given on the command line override the params file.
Problems users can fix print one line and exit with code 2.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import config as cfg
from pipeline.atomic import out_of_space
from pipeline.distributed import is_main_process
from pipeline.errors import PipelineError
from pipeline.preemption import Stopped

# Nested sections whose options keep their own names (distill --epochs, not --train-epochs).
UNPREFIXED = {"train"}

app = typer.Typer(
    name="python -m pipeline",
    help="csm-distill: distil a CLIP teacher into a small student by cross-modal similarity "
    "matching, with cached teacher outputs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: full option names at any width (rich cuts them at 80 columns)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def params_path_from_argv(argv: list[str]) -> Path:
    """`--params FILE` is needed before typer parses anything: it sets the shown defaults."""
    for i, arg in enumerate(argv):
        if arg == "--params" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return cfg.DEFAULT_PARAMS


# Only for the defaults shown by --help (they are rendered before any option is parsed); what
# a command runs with is the --params value parsed by `root`, `active_params()`.
PARAMS_PATH = params_path_from_argv(sys.argv[1:])
_ACTIVE_PARAMS = [cfg.DEFAULT_PARAMS]


def active_params() -> Path:
    """The params file of the command being run (`--params`, else ./params.yaml)."""
    return _ACTIVE_PARAMS[0]


@app.callback()
def root(
    params: Path = typer.Option(
        cfg.DEFAULT_PARAMS, "--params", help="params file with the defaults of every stage"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    _ACTIVE_PARAMS[0] = params
    # Our loggers at INFO; libraries (open_clip logs on the root logger) only warn unless -v.
    # Under torchrun only rank 0 reports progress; the other ranks say only what goes wrong.
    level = logging.DEBUG if verbose else logging.INFO if is_main_process() else logging.WARNING
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)


def leaf_value(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def stage_command(name: str, stage: str, module: str, help: str) -> None:
    """Register `name` as a command whose options are the fields of `stage`'s config."""
    config_cls = cfg.STAGE_CONFIGS[stage]
    try:
        defaults = cfg.load_config(stage, PARAMS_PATH)
    except PipelineError:
        defaults = None  # reported when the command runs, not while listing commands

    leaves = []
    for f, tp in cfg.config_fields(config_cls):
        if cfg.is_config(tp):
            for sub_f, sub_tp in cfg.config_fields(tp):
                option = sub_f.name if f.name in UNPREFIXED else f"{f.name}_{sub_f.name}"
                leaves.append((option, f"{f.name}.{sub_f.name}", sub_tp, sub_f))
        else:
            leaves.append((f.name, f.name, tp, f))

    parameters = [option_parameter(option, tp, f, leaf_value(defaults, dotted) if defaults is not None else None)
                  for option, dotted, tp, f in leaves]

    def command(**options: Any) -> None:
        config = cfg.load_config(stage, active_params())
        changes = {dotted: options[option] for option, dotted, _, _ in leaves
                   if options[option] is not None}
        config = cfg.override(config, changes)
        stage_module = importlib.import_module(module)
        stage_module.run(config)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = help
    app.command(name, help=help)(command)


def option_parameter(option: str, tp: Any, f: Any, default: Any) -> inspect.Parameter:
    """The command-line option `--OPTION` of config field `f` (type `tp`): its help with the choices
    and the params file's value (`default`; None: not readable now, reported when a command runs)."""
    choices = cfg.field_choices(f)
    text = cfg.field_help(f) + (f"; one of {', '.join(choices)}" if choices else "")
    text += f"  (default: {repr_default(default) if default is not None else 'from params.yaml'})"
    flag = "--" + option.replace("_", "-")
    decls = [f"{flag}/--no-{option.replace('_', '-')}"] if tp is bool else [flag]
    return inspect.Parameter(
        option,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, *decls, help=text, show_default=False),
        annotation=Optional[tp],  # noqa: UP045 (typer needs a typing.Optional)
    )


def repr_default(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if value == "":
        return "''"
    return str(value)


stage_command("shards", "shards", "stages.shards",
              "Write webdataset shards from an image folder or the built-in demo world.")
stage_command("demo-teacher", "demo_teacher", "stages.demo_teacher",
              "Train the tiny demo CLIP teacher on the demo world's captions.")
stage_command("precompute", "precompute", "stages.precompute",
              "Stage one: run the teacher once over augmented views into an HDF5 cache.")
stage_command("distill", "distill", "stages.distill",
              "Stage two: train the student with CSM against the cached teacher targets.")
stage_command("supervised", "supervised", "stages.supervised",
              "Train the supervised reference (cross-entropy, same views and schedule).")
stage_command("ssl", "ssl", "stages.ssl",
              "Train a vision-only self-supervised baseline (SimCLR or BYOL, lightly's) for the probe table.")
stage_command("probe", "probe", "stages.probe",
              "Linear probe and zero-shot of teacher, student and baselines.")
stage_command("bench", "bench", "stages.bench",
              "Measure the cost of caching: plain, cached and online training side by side.")


@app.command("inspect")
def inspect_cache(
    file: Path = typer.Argument(..., help="teacher cache (HDF5) written by precompute"),
    tau_teacher: float = typer.Option(
        None, help="temperature for the summary (default: distill.tau_teacher of params.yaml)"
    ),
) -> None:
    """Print a teacher cache's identity, counts, anchors and a summary of its targets."""
    from stages import inspect as inspect_stage

    if tau_teacher is None:
        tau_teacher = cfg.load_config("distill", active_params()).tau_teacher
    inspect_stage.run(file, tau_teacher)


@app.command("verify")
def verify_cache(
    file: Path = typer.Argument(..., help="teacher cache (HDF5) written by precompute"),
) -> None:
    """Check a teacher cache's structure and every shard's checksums; list the bad shards."""
    from stages import verify as verify_stage

    verify_stage.run(file)


@app.command("plan")
def plan(
    train_images: int = typer.Option(0, help="train images of the run (0: from the shards' manifest)"),
    val_images: int = typer.Option(0, help="val images of the run (0: from the shards' manifest)"),
    classes: int = typer.Option(0, help="classes of the run (0: from the shards' manifest)"),
    topk: int = typer.Option(0, help="k of the top-k cache size shown beside the full one (0: precompute.topk, "
                                     "else 64)"),
    processes: int = typer.Option(1, help="torchrun processes per machine (GPUs per node)"),
    gpu_images_per_second: float = typer.Option(0.0, help="one GPU's distill rate, images/s (e.g. from `bench` "
                                                          "on it): prints the CPU cores per GPU the data path needs"),
    teacher_views_per_second: float = typer.Option(0.0, help="one GPU's teacher rate in precompute, views/s: "
                                                             "prints the cores per GPU precompute's data path needs"),
    bench_json: Path = typer.Option(None, help="take the data path's per-core rates from this `bench --json` "
                                               "file instead of timing them now"),
    json_out: Path = typer.Option(None, "--json", help="also write the plan as JSON"),
) -> None:
    """Print what a run of the params file will need: cache bytes, disk, shared memory, probe
    memory, FLOPs per image, and the CPU cores per GPU of its data path."""
    from pipeline import plan as planning
    from pipeline.atomic import write_json

    per_core = planning.per_core_from_bench(bench_json) if bench_json else None
    result = planning.make_plan(active_params(), train_images, val_images, classes, topk, processes,
                                gpu_images_per_second, per_core, teacher_views_per_second=teacher_views_per_second)
    print("\n".join(planning.describe(result)))
    if json_out:
        write_json(json_out, result)


@app.command("report")
def report(
    file: Path = typer.Argument(Path("metrics/probe.json"), help="probe metrics JSON"),
) -> None:
    """Print the probe table from a probe metrics file."""
    from stages import probe

    probe.print_table(probe.read_metrics(file))


def probe_default(key: str) -> str:
    """`probe.KEY = value` of the params file, for --help of the commands that use the student."""
    try:
        return f"probe.{key} = {getattr(cfg.load_config('probe', PARAMS_PATH), key)}"
    except PipelineError:
        return f"probe.{key} of params.yaml"  # reported when the command runs, not while listing commands


FROM_CHECKPOINT = "the path the student's checkpoint records, if it exists here"
STUDENT_HELP = f"distilled student checkpoint (default: {probe_default('student')})"
CACHE_HELP = (f"teacher cache holding the anchors the student was distilled against (default: {FROM_CHECKPOINT}; "
              f"else {probe_default('cache')})")
SHARDS_HELP = (f"shard directory whose classes.json names the cache's classes (default: {FROM_CHECKPOINT}; "
               f"else {probe_default('shards')})")


def teacher_parameters() -> list[inspect.Parameter]:
    """--teacher-model, --teacher-pretrained, ...: TeacherConfig's fields, with the help and the params
    defaults that every stage shows for them."""
    try:
        defaults = cfg.load_config("probe", PARAMS_PATH).teacher  # the params' teacher section
    except PipelineError:
        defaults = None  # reported when the command runs, not while listing commands
    return [option_parameter(f"teacher_{f.name}", tp, f, getattr(defaults, f.name) if defaults is not None else None)
            for f, tp in cfg.config_fields(cfg.TeacherConfig)]


def with_teacher_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the teacher options of the other stages; it receives them as `**teacher_options`."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*own, *teacher_parameters()])  # type: ignore[attr-defined]
    return command


def given_teacher(teacher_options: dict[str, Any]) -> cfg.TeacherConfig | None:
    """The params' teacher section with the teacher options given applied over it; None if none given."""
    changes = {name.removeprefix("teacher_"): value for name, value in teacher_options.items() if value is not None}
    return cfg.override(cfg.load_config("probe", active_params()).teacher, changes) if changes else None


@app.command("predict")
@with_teacher_options
def predict(
    images: list[Path] = typer.Argument(..., help="image files, or folders searched recursively for images"),
    student: Path = typer.Option(None, help=STUDENT_HELP),
    cache: Path = typer.Option(None, help=CACHE_HELP),
    shards: Path = typer.Option(None, help=SHARDS_HELP),
    teacher: bool = typer.Option(False, "--teacher", help="also the teacher's top classes (the params' teacher "
                                 "section with the --teacher-* options over it; must be the teacher the cache "
                                 "records)"),
    json_file: Path = typer.Option(None, "--json", help="also write every prediction to this JSON file"),
    top: int = typer.Option(5, help="classes shown per image"),
    device: str = typer.Option(None, help=f"auto, cpu or cuda (default: {probe_default('device')})"),
    **teacher_options: Any,
) -> None:
    """Print the student's top-5 classes, with probabilities, for image files and folders."""
    from stages import predict as predict_stage

    probe = cfg.load_config("probe", active_params())
    distill = cfg.load_config("distill", active_params())
    teacher_config = given_teacher(teacher_options)  # checked against the cache even without --teacher
    if teacher and teacher_config is None:
        teacher_config = probe.teacher
    predict_stage.run(predict_stage.PredictConfig(
        inputs=tuple(images), files=predict_stage.StudentFiles(student, cache, shards, active_params()),
        tau_student=distill.tau_student, tau_teacher=distill.tau_teacher, teacher=teacher_config,
        show_teacher=teacher, device=device or probe.device, json=json_file, top=top))


@app.command("export")
@with_teacher_options
def export(
    out: Path = typer.Option(..., "--out", help="directory for the exported files"),
    export_format: str = typer.Option("standalone", "--format", help="standalone: student.torchscript.pt, "
                                      "student.onnx, anchors.npy and classes.json; open_clip: the student with the "
                                      "teacher's text tower as an open_clip model (open_clip_config.json, "
                                      "open_clip_model.safetensors, README.md, config.json; needs an open_clip "
                                      "teacher: the params' teacher section with the --teacher-* options over it)"),
    student: Path = typer.Option(None, help=STUDENT_HELP),
    cache: Path = typer.Option(None, help=CACHE_HELP),
    shards: Path = typer.Option(None, help=SHARDS_HELP),
    **teacher_options: Any,
) -> None:
    """Write the student as TorchScript and ONNX image encoders with its anchors and class names, or as an
    open_clip model (--format open_clip)."""
    from stages import export as export_stage
    from stages.predict import StudentFiles

    export_stage.run(StudentFiles(student, cache, shards, active_params()), out,
                     cfg.load_config("distill", active_params()).tau_student, given_teacher(teacher_options),
                     export_format)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command: Callable[..., Any] = typer.main.get_command(app)
    try:
        with logging_redirect_tqdm():  # log lines print above an active progress bar, not through it
            result = command.main(args=argv, prog_name="python -m pipeline", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except Stopped as stop:  # a signal: the stage saved its work and logged where it stopped
        return stop.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as err:  # usage errors: unknown option, bad value, missing argument
        context = getattr(err, "ctx", None)
        where = f" (see: {context.command_path} --help)" if context is not None else ""
        print(f"error: {one_line(err.format_message())}{where}", file=sys.stderr)
        return 2
    except PipelineError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if not out_of_space(err):
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{one_line(err.strerror or str(err))}: the disk is full or a file-size limit was "
              f"reached; free space and run the same command again", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
