#!/usr/bin/env bash
# Deploy a cvat-detector function to the Nuclio that serves CVAT (Docker, `--platform local`).
#
#   ./deploy_gpu.sh [options] FUNCTION_DIR|RUN [-- extra `nuctl deploy` flags]
#
# FUNCTION_DIR is what `python -m trainer package` wrote. A trained RUN (a directory with
# model.json) is packaged first, into RUN/nuclio-function (replaced on every deploy).
#
# Options:
#   --network NAME   Docker network of CVAT (default: $CVAT_NETWORK, else cvat_cvat as in CVAT's
#                    own deploy_gpu.sh); --network '' deploys on Docker's default network
#   --name NAME      display name when packaging a RUN (default: the run directory's name)
#   --cpu            package a RUN for the CPU (no GPU limit, no NVIDIA checks)
#   --wait SECONDS   how long to wait for the function to become ready (default: 600)
#   --no-gpu-check   skip the nvidia-smi / Docker runtime checks (Docker on another host)
#
# Environment: PYTHON (interpreter with cvat-detector installed, for packaging a RUN; default: the
# repository's .venv, else python3), CVAT_NETWORK.
set -euo pipefail

readonly PROJECT=cvat
# A 64x48 PNG for the sample request body (any frame file works).
readonly SAMPLE_PNG_BASE64='iVBORw0KGgoAAAANSUhEUgAAAEAAAAAwCAIAAAAuKetIAAAAaUlEQVR42u3YsQ2AMBADQBORiZiEITITNRMwBSU7sUNoiHKW2y9O33lJsqaM3FqSgQsAAAAAANB9fD13enNu7Q8f+JBaAAAAAAAAAAAAAAAAAOYF7EfrX5WrVQIAAAAAAAAAAAAAYHLAC+soHPpefsGAAAAAAElFTkSuQmCC'

die() {
    printf 'deploy_gpu.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

need_value() {
    (($# >= 2)) || die "$1 needs a value (see --help)"
}

network=${CVAT_NETWORK-cvat_cvat}
name=""
cpu=0
wait_s=600
gpu_check=1
target=""
extra=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --network) need_value "$@"; network=$2; shift 2 ;;
        --name) need_value "$@"; name=$2; shift 2 ;;
        --wait) need_value "$@"; wait_s=$2; shift 2 ;;
        --cpu) cpu=1; shift ;;
        --no-gpu-check) gpu_check=0; shift ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            [[ -z $target ]] || die "expected one FUNCTION_DIR or RUN, got '$target' and '$1'"
            target=$1
            shift
            ;;
    esac
done
[[ -n $target ]] || die "missing FUNCTION_DIR or RUN (see --help)"
[[ -d $target ]] || die "$target: no such directory"
[[ $wait_s =~ ^[0-9]+$ ]] || die "--wait: expected a number of seconds, got '$wait_s'"

command -v nuctl >/dev/null ||
    die "nuctl not found on PATH: install the Nuclio CLI of the same version as CVAT's Nuclio (docs/deploy.md)"
command -v docker >/dev/null ||
    die "docker not found on PATH: nuctl --platform local builds and runs functions with Docker"

# 1. The function directory: as given, or packaged from a run ------------------------------------
if [[ -f $target/function.yaml ]]; then
    fn_dir=$target
    [[ -z $name && $cpu == 0 ]] || die "--name and --cpu apply to packaging a RUN; $target is already a function"
elif [[ -f $target/model.json ]]; then
    fn_dir=$target/nuclio-function
    python=${PYTHON:-}
    if [[ -z $python ]]; then
        repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
        python=python3
        [[ -x $repo/.venv/bin/python ]] && python=$repo/.venv/bin/python
    fi
    command -v "$python" >/dev/null ||
        die "$python not found: set PYTHON to the interpreter where cvat-detector is installed"
    package=(-m trainer package "$target" --out "$fn_dir" --overwrite)
    [[ -n $name ]] && package+=(--name "$name")
    ((cpu)) && package+=(--cpu)
    echo "== packaging run $target"
    "$python" "${package[@]}" || die "packaging $target failed (see the message above)"
else
    die "$target: neither a function directory (function.yaml) nor a trained run (model.json)"
fi
config=$fn_dir/function.yaml
fn_name=$(awk '/^metadata:/ { m = 1; next } m && /^[^ #]/ { m = 0 }
               m && /^  name:/ { gsub(/["\047]/, "", $2); print $2; exit }' "$config")
[[ -n $fn_name ]] || die "$config: no metadata.name"

# 2. GPU: a driver here and Docker able to hand the GPU to containers ------------------------------
if grep -q 'nvidia.com/gpu' "$config" && ((gpu_check)); then
    command -v nvidia-smi >/dev/null ||
        die "nvidia-smi not found: $fn_name asks for a GPU but no NVIDIA driver is installed (package with --cpu, or pass --no-gpu-check when Docker runs on another host)"
    gpus=$(nvidia-smi -L 2>&1) || die "nvidia-smi failed: $gpus"
    [[ $gpus == *GPU* ]] || die "nvidia-smi lists no GPU: $gpus"
    runtimes=$(docker info --format '{{json .Runtimes}}' 2>&1) ||
        die "docker info failed (is the Docker daemon running, may this user use it?): $runtimes"
    [[ $runtimes == *nvidia* ]] ||
        die "Docker has no 'nvidia' runtime: install the NVIDIA Container Toolkit, then 'sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker'"
    echo "== GPU: ${gpus%%$'\n'*}"
fi

# 3. CVAT's network and the Nuclio project CVAT lists --------------------------------------------
platform_config=()
if [[ -n $network ]]; then
    docker network inspect "$network" >/dev/null 2>&1 ||
        die "Docker network '$network' not found: start CVAT with components/serverless/docker-compose.serverless.yml, or pass --network NAME (or CVAT_NETWORK), or --network '' for none"
    platform_config=(--platform-config "{\"attributes\": {\"network\": \"$network\"}}")
fi
projects=$(nuctl get project "$PROJECT" --platform local 2>&1) ||
    die "nuctl get project $PROJECT failed: $projects"
if [[ $projects == *"No projects found"* || $projects != *"$PROJECT"* ]]; then
    echo "== creating Nuclio project $PROJECT"
    nuctl create project "$PROJECT" --platform local ||
        die "nuctl create project $PROJECT failed (see the message above)"
fi

# 4. Build and deploy ------------------------------------------------------------------------------
echo "== deploying $fn_name from $fn_dir (this builds a Docker image: minutes the first time)"
nuctl deploy --project-name "$PROJECT" --path "$fn_dir" --file "$config" --platform local \
    "${platform_config[@]}" "${extra[@]}" ||
    die "nuctl deploy of $fn_name failed (see its output above; 'docker logs nuclio-nuclio-$fn_name' shows the function's own log)"

# 5. Wait until Nuclio reports it ready ----------------------------------------------------------
function_state() { # prints "STATE PORT" from `nuctl get function NAME`'s table
    nuctl get function "$fn_name" --platform local 2>/dev/null | awk -v fn="$fn_name" '
        BEGIN { FS = "|" }
        { for (i = 1; i <= NF; i++) gsub(/^[ \t]+|[ \t]+$/, "", $i) }
        !state { for (i = 1; i <= NF; i++) { h = toupper($i)
                     if (h == "STATE") state = i; if (h == "NAME") nm = i; if (h == "NODE PORT") port = i }
                 next }
        nm && $nm == fn { print $state, (port ? $port : ""); exit }'
}
deadline=$((SECONDS + wait_s))
while :; do
    state="" port=""
    read -r state port < <(function_state) || true
    case ${state:-} in
        ready) break ;;
        error | unhealthy)
            die "$fn_name is $state: see 'nuctl get function $fn_name --platform local -o yaml' and 'docker logs nuclio-nuclio-$fn_name'" ;;
    esac
    ((SECONDS < deadline)) ||
        die "$fn_name not ready after ${wait_s}s (state: ${state:-unknown}); see 'docker logs nuclio-nuclio-$fn_name'"
    sleep 2
done

# 6. How to call it ----------------------------------------------------------------------------------
sample=$fn_dir/sample.json
printf '{"image": "%s", "threshold": 0.5}\n' "$SAMPLE_PNG_BASE64" >"$sample"
cat <<EOF
== $fn_name is ready${port:+ on port $port} in Nuclio project $PROJECT
Try it with a sample request ($sample):
  nuctl invoke $fn_name --platform local --method POST --content-type application/json --body "\$(cat $sample)"
In CVAT it is listed on the Models page; use it from AI Tools → Detectors in a job, or from
Actions → Automatic annotation on a task (labels are matched by name).
EOF
