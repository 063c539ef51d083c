"""Static checks of the deployment files in deploy/ (fast, no network, no Docker)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sampleclr_scale.cli import build_parser
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.evaluate import EvaluateConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONTAINER_ROOT = "/app/"  # where the images put the repository's deploy/ files
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "&", "(", ")"}
CONFIG_CLASSES = {"train": TrainConfig, "evaluate": EvaluateConfig}
YAML_FILES = sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml"))
# options naming data (stores, runs, embeddings, reports, SOMA targets): URIs in the guide
LOCATION_OPTIONS = ("store", "out", "checkpoint", "embeddings", "write_back")
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def repo_path(path: str) -> Path:
    """A path named in a deploy file, as a file of this repository."""
    if path.startswith(CONTAINER_ROOT):
        return ROOT / path[len(CONTAINER_ROOT):]
    return ROOT / path


def command_argv(line: str) -> list[str] | None:
    """The ``sampleclr-scale ...`` command in a shell line (up to a shell operator)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = list(lexer)
    if "sampleclr-scale" not in tokens:
        return None
    argv = tokens[tokens.index("sampleclr-scale"):]
    for i, token in enumerate(argv):
        if token in SHELL_OPERATORS:
            return argv[:i]
    return argv


def check_command(argv: list[str], where: str) -> None:
    """The command parses with the CLI's own parser and names config files that exist."""
    assert argv[0] == "sampleclr-scale", where
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as err:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse (exit {err.code})")
    config = getattr(args, "config", None)
    if config:
        path = repo_path(config)
        assert path.is_file(), f"{where}: --config {config} is not in the repository"
        if args.command in CONFIG_CLASSES:
            CONFIG_CLASSES[args.command].from_yaml(path)


def fenced_commands(markdown: str) -> list[str]:
    """Logical lines (backslash continuations joined) of the fenced code blocks."""
    lines: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def comment_commands(text: str) -> list[list[str]]:
    """``sampleclr-scale`` commands shown in a YAML file's comments: indented comment lines
    (``#`` and two or more spaces, prose has one) that start with ``sampleclr-scale`` or
    ``ray job submit``, after an optional ``$`` prompt; backslash continuations joined."""
    comments = [re.sub(r"^\s*#\s*(\$ )?", "", line)
                for line in text.splitlines() if re.match(r"\s*#\s\s", line)]
    lines = "\n".join(comments).replace("\\\n", " ").splitlines()
    return [argv for line in lines if line.startswith(("sampleclr-scale ", "ray job submit "))
            and (argv := command_argv(line))]


def readme_commands() -> list[list[str]]:
    lines = fenced_commands((DEPLOY / "README.md").read_text())
    return [argv for line in lines if (argv := command_argv(line))]


def ray_cluster_commands() -> list[list[str]]:
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    lines = yaml_strings(yaml.safe_load(text))
    return [argv for line in lines if (argv := command_argv(line))] + comment_commands(text)


def locations(argv: list[str]) -> list[str]:
    """The stores, run directories, embeddings ... a command names (NAME= prefixes dropped)."""
    args = build_parser().parse_args(argv[1:])
    found = []
    for option in LOCATION_OPTIONS:
        value = getattr(args, option, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                name, sep, path = item.partition("=")
                found.append(path if sep and "://" not in name else item)
    return found


def yaml_strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in yaml_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in yaml_strings(value)]
    return [node] if isinstance(node, str) else []


# --- YAML files --------------------------------------------------------------------------

def test_deploy_has_the_expected_files():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "ray-cluster.yaml", "rayjob.yaml",
                 "train-census.yaml", "evaluate-census.yaml", "README.md"):
        assert (DEPLOY / name).is_file(), name
    assert not (DEPLOY / "pvc.yaml").exists(), "no shared volume: everything is on S3"


def test_readme_file_table_lists_the_deploy_files():
    text = (DEPLOY / "README.md").read_text()
    table = re.findall(r"^\| `([^`]+)` \|", text.split("\n## ", 1)[0], flags=re.M)
    files = {p.name for p in DEPLOY.iterdir()
             if p.is_file() and p.name != "README.md" and not p.name.endswith(".dockerignore")}
    assert sorted(table) == sorted(files)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_comment_commands_parse(path):
    for argv in comment_commands(path.read_text()):
        check_command(argv, f"{path.name} comment")
        for where in locations(argv):
            assert where.startswith("s3://BUCKET/"), (path.name, shlex.join(argv))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_train_config_validates():
    config = TrainConfig.from_yaml(DEPLOY / "train-census.yaml")
    assert config.use_gpu
    assert config.storage_path is None  # checkpoints go to RUN/ray, next to the run on S3
    assert config.loader.num_workers >= 1
    assert config.global_batch == config.workers * config.loader.batch_size


def test_evaluate_config_validates():
    EvaluateConfig.from_yaml(DEPLOY / "evaluate-census.yaml")


# --- RayJob -------------------------------------------------------------------------------

def test_rayjob_structure():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    assert "rayStartParams" in cluster["headGroupSpec"]
    gpu_groups = [
        group for group in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
               for c in group["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert "rayStartParams" in group
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_rayjob_entrypoint_is_a_valid_training_command():
    job = load("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "sampleclr-scale"
    check_command(argv, "rayjob.yaml entrypoint")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train"
    assert args.use_gpu is True
    assert args.config and repo_path(args.config).is_file()
    config = TrainConfig.from_yaml(repo_path(args.config))
    replicas = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert (args.workers or config.workers) <= replicas


def test_rayjob_uses_s3_with_the_secrets_credentials_on_every_pod():
    job = load("rayjob.yaml")
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert args.store.startswith("s3://") and args.out.startswith("s3://")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        spec = pod["template"]["spec"]
        assert not [v for v in spec.get("volumes", []) if "persistentVolumeClaim" in v], pod
        for container in spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name in AWS_SECRET_ENV:
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "aws-credentials", "key": name}, (container["name"], ref)
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, container["name"]


# --- ray up cluster ---------------------------------------------------------------------

def test_ray_cluster_config_validates_against_rays_schema():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import validate_config

    config = load("ray-cluster.yaml")
    validate_config(config)
    assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert "cuda" in config["docker"]["image"]
    workers = [t for name, t in config["available_node_types"].items()
               if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4", "p5"))
               for t in workers)
    # ray up runs `docker run ... IMAGE bash`: the sampleclr-scale ENTRYPOINT must be cleared.
    assert any(o.replace("'", '"') == '--entrypoint=""' for o in config["docker"]["run_options"])
    # no shared filesystem: nothing mounted on the hosts or bind-mounted into the container
    assert not config.get("initialization_commands")
    assert not [o for o in config["docker"]["run_options"] if o.startswith(("-v ", "--volume"))]
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"]


def test_ray_cluster_commands_parse():
    commands = ray_cluster_commands()
    assert commands, "ray-cluster.yaml shows no sampleclr-scale command"
    for argv in commands:
        check_command(argv, "ray-cluster.yaml")


# --- README ---------------------------------------------------------------------------------

def test_readme_commands_parse():
    commands = readme_commands()
    names = {argv[1] for argv in commands}
    assert {"ingest", "prior", "train", "embed", "evaluate"} <= names, names
    for argv in commands:
        check_command(argv, "deploy/README.md")


def test_commands_name_s3_uris():
    """The guide's stores, runs, embeddings and reports are on S3, not local paths."""
    commands = [("deploy/README.md", argv) for argv in readme_commands()]
    commands += [("ray-cluster.yaml", argv) for argv in ray_cluster_commands()]
    job = load("rayjob.yaml")
    commands.append(("rayjob.yaml", shlex.split(job["spec"]["entrypoint"])))
    checked = 0
    for where, argv in commands:
        for location in locations(argv):
            assert location.startswith("s3://BUCKET/"), (where, shlex.join(argv))
            checked += 1
    assert checked >= 10, checked


def test_readme_shows_both_ways_to_submit():
    text = (DEPLOY / "README.md").read_text()
    assert "ray job submit --address" in text
    assert "kubectl apply -f deploy/rayjob.yaml" in text


# --- Dockerfiles ----------------------------------------------------------------------------

def dockerfile(name: str) -> tuple[str, list[str]]:
    """A Dockerfile's instructions (continuations joined) and its resolved base images."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    instructions = [line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    args: dict[str, str] = {}
    stages: set[str] = set()
    bases = []
    for line in instructions:
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "ARG" and "=" in rest and not bases:
            key, _, value = rest.strip().partition("=")
            args[key] = value
        elif keyword.upper() == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: args[m.group(1) or m.group(2)], words[0])
            if image not in stages:
                bases.append(image)
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
    return "\n".join(instructions), bases


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name):
    text, bases = dockerfile(name)
    assert bases
    for image in bases:
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag and tag != "latest", image
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.*)$", text, flags=re.M)
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["sampleclr-scale"]
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the package is not pip-installed"
    assert re.search(r"pip install[^\n]*torch", text)
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    copies = re.findall(r"^COPY\s+(.*)$", text, flags=re.M)
    assert "pyproject.toml" in copies[0], "copy pyproject.toml first, for the layer cache"


def test_cpu_image_uses_the_cpu_torch_index():
    text, bases = dockerfile("Dockerfile.cpu")
    assert all(b.startswith("python:3.11-slim") for b in bases)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_cuda_image_matches_the_clusters_ray_version():
    text, bases = dockerfile("Dockerfile.cuda")
    (base,) = bases
    version = load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
    assert base.startswith(f"rayproject/ray:{version}-py311"), base
    index = re.search(r"download\.pytorch\.org/whl/(\S+?)[\"\s]", text)
    assert index, "torch is not installed from the PyTorch index"
    cuda = re.sub(r"\$\{TORCH_CUDA\}", re.search(r"ARG TORCH_CUDA=(\S+)", text).group(1),
                  index.group(1))
    assert re.fullmatch(r"cu1[2-9]\d", cuda), cuda
