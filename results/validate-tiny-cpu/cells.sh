# Shared by this folder's scripts (sourced first): from the repo root, a warm-up, and one validate cell.
set -u
cd "$(dirname "$0")/../.."

warm_up() {  # config, steps: training that is not measured, so that the VM's slow first minutes of load fall on no cell
  local warm
  warm=$(mktemp -d)
  stalecast train "$1" --steps "$2" --out "$warm/run" > /dev/null 2>&1
  echo "warm-up: exit $?"
  rm -rf "$warm"
}

cell() {  # name, config, then validate options: writes results/validate-tiny-cpu/NAME/ and NAME.log
  local name=$1 config=$2
  shift 2
  stalecast validate "$config" "$@" --out "results/validate-tiny-cpu/$name" > "results/validate-tiny-cpu/$name.log" 2>&1
  echo "$name: exit $?"
}
