#!/usr/bin/env bash
# Validates every manifest in config/kubernetes/ against the Kubernetes JSON schemas that the
# PyPI package kubernetes-validate ships inside itself (no network), in strict mode: unknown or
# misspelt fields fail. Exits non-zero and names each invalid file. tests/kubernetes.rs runs it;
# tests/run.sh installs kubernetes-validate.
#
#   bash tests/kubernetes/validate.sh              # every config/kubernetes/*.yaml
#   bash tests/kubernetes/validate.sh FILE...      # just these
#
# Checked against the oldest Kubernetes the manifests need (1.30: lifecycle.preStop.sleep) and
# the newest kubernetes-validate 1.37.0 knows; override with K8S_VERSIONS="1.31.0 1.37.0".
set -uo pipefail
cd "$(dirname "$0")/../.."

versions=(${K8S_VERSIONS:-1.30.0 1.37.0})

if ! command -v kubernetes-validate >/dev/null; then
    echo "validate.sh: kubernetes-validate is not on PATH; run tests/run.sh (it installs it)" >&2
    exit 127
fi

if [ $# -gt 0 ]; then
    files=("$@")
else
    shopt -s nullglob
    files=(config/kubernetes/*.yaml config/kubernetes/*.yml)
    if [ ${#files[@]} -eq 0 ]; then
        echo "validate.sh: no manifests in config/kubernetes/" >&2
        exit 1
    fi
fi

# PyYAML keeps the last of two equal keys silently (kubectl refuses them): check with the Python
# that runs kubernetes-validate, which has PyYAML.
python=python3
shebang=$(head -c 200 "$(command -v kubernetes-validate)" | head -n 1)
case "$shebang" in '#!'*python*) python=${shebang#'#!'} ;; esac

failed=()
for f in "${files[@]}"; do
    if ! dup=$($python - "$f" 2>&1 <<'PY'
import sys, yaml
class Loader(yaml.SafeLoader):
    pass
def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)
Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
try:
    with open(sys.argv[1]) as fh:
        list(yaml.load_all(fh, Loader=Loader))
except (OSError, yaml.YAMLError) as e:
    sys.exit(str(e).replace("\n", " "))
PY
    ); then
        echo "ERROR $f: not valid YAML: $dup"
        failed+=("$f")
        continue
    fi
    for v in "${versions[@]}"; do
        out=$(kubernetes-validate --strict --kubernetes-version "$v" "$f" 2>&1)
        rc=$?
        printf '%s\n' "$out"
        # kubernetes-validate only warns, exit 0, for a kind/apiVersion it has no schema for (a
        # typo, or an API removed in $v): count that as a failure, as well as a file with no object.
        if [ $rc -ne 0 ] || grep -qE '^(WARN|ERROR|FATAL)' <<<"$out" || ! grep -q '^INFO .* passed' <<<"$out"; then
            [ -n "$out" ] || echo "ERROR $f: no Kubernetes object in it"
            failed+=("$f (Kubernetes $v)")
        fi
    done
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "validate.sh: ${#failed[@]} failure(s):"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "validate.sh: ${#files[@]} file(s) valid against Kubernetes ${versions[*]} (strict)"
