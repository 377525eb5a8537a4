#!/usr/bin/env bash
# Smoke test of a deployed (or local) diffusers-runtime through the KServe V1 protocol.
#
#   scripts/test-v1.sh URL [MODEL]
#     URL    the model endpoint root: the InferenceService URL (`oc get isvc NAME -o
#            jsonpath='{.status.url}'`), a Route, or a local server (http://localhost:8080);
#            a URL with its route (…/v1/models/NAME:predict) is cut to its root, NAME taken from it
#     MODEL  the model name in the route (the InferenceService's name); default $MODEL_NAME, else the one
#            model URL/v1/models lists (a local `npm start` or `make run-local` serves "model")
#
# POSTs scripts/v1_input.json (the seed runtime's example request) to URL/v1/models/MODEL:predict,
# checks HTTP 200, decodes predictions[0].image.b64, verifies the PNG signature and prints
# width x height (from the IHDR chunk), the image's byte size and the latency.
# Environment: INPUT (request file), OUTPUT (also write the PNG there), TIMEOUT (s, default 900),
# TOKEN (sends "Authorization: Bearer $TOKEN", for token-protected OpenShift AI endpoints),
# INSECURE=1 (curl -k, self-signed routes).
# Needs curl, and node or base64+od (no python).
set -euo pipefail

die() { echo "test-v1: FAIL: $*" >&2; exit 1; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  # The comment block at the top of this file, without its '# '.
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi

url=${1%/}
model=${2:-${MODEL_NAME:-}}
# A URL copied with its route (…/v1/models/NAME:predict, …/v2/models/NAME/infer): its root, and NAME unless given.
if [[ $url =~ ^(https?://.*)/v[12]/models/([^/:]+)(:predict|/infer|/ready)?$ ]]; then
  url=${BASH_REMATCH[1]}
  if [[ -z $model ]]; then model=${BASH_REMATCH[2]}; fi
  echo "URL: $url (the root of the route given; model ${model})"
elif [[ $url =~ ^(https?://.*)/v[12]/models$ ]]; then
  url=${BASH_REMATCH[1]}
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
input=${INPUT:-$here/v1_input.json}
timeout=${TIMEOUT:-900}

[[ $url =~ ^https?:// ]] || die "URL must start with http:// or https:// (got '$url')"
[[ -r $input ]] || die "request file not readable: $input"
command -v curl >/dev/null || die "curl is required"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
resp=$tmp/response.json
png=$tmp/image.png

curl_opts=(--silent --show-error --max-time "$timeout" -o "$resp" -w '%{http_code} %{time_total}'
  -H 'Content-Type: application/json' --data-binary "@$input")
[[ -n ${TOKEN:-} ]] && curl_opts+=(-H "Authorization: Bearer $TOKEN")
[[ ${INSECURE:-0} == 1 ]] && curl_opts+=(-k)

# The names the server serves ({"models":["a","b"]}), space-separated; empty when it does not answer.
served_names() {
  local auth=()
  [[ -n ${TOKEN:-} ]] && auth=(-H "Authorization: Bearer $TOKEN")
  [[ ${INSECURE:-0} == 1 ]] && auth+=(-k)
  curl --silent --max-time 15 "${auth[@]}" "$url/v1/models" 2>/dev/null |
    tr -d '\n' | sed -n 's/.*"models"[[:space:]]*:[[:space:]]*\[\([^]]*\)\].*/\1/p' | tr -d '" ' | tr ',' ' ' || true
}

if [[ -z $model ]]; then
  names=$(served_names)
  if [[ -n $names && $names != *" "* ]]; then
    model=$names
    echo "model: $model (the one model $url serves)"
  else
    model=model
  fi
fi

endpoint="$url/v1/models/$model:predict"
echo "POST $endpoint ($(basename "$input"))"
start=$SECONDS
rc=0
result=$(curl "${curl_opts[@]}" "$endpoint") || rc=$?
if [[ $rc != 0 ]]; then
  # curl's exit status says how it failed; only 28 is the time limit running out.
  case $rc in
    6) die "could not resolve the host of $url (curl exit 6): check the URL" ;;
    7) die "could not reach the server at $url (curl exit 7, connection refused or no route, after $((SECONDS - start))s): is it running and listening there (make run-local; oc get isvc)?" ;;
    28) die "no answer within ${timeout}s (TIMEOUT; curl exit 28): $endpoint" ;;
    35 | 60) die "TLS with $url failed (curl exit $rc); a self-signed route needs INSECURE=1" ;;
    52 | 56) die "the server at $url closed the connection without an answer (curl exit $rc): $endpoint" ;;
    *) die "request failed (curl exit $rc after $((SECONDS - start))s): $endpoint" ;;
  esac
fi
read -r code seconds <<<"$result"

if [[ $code != 200 ]]; then
  body=$(head -c 600 "$resp" 2>/dev/null || true)
  hint=""
  case $code in
    404)
      names=$(served_names)
      hint=" (unknown model name '$model'; ${names:+this server serves: $names; }list them: curl $url/v1/models)" ;;
    503) hint=" (not ready yet, or queue full: curl $url/v1/models/$model shows the boot state and progress)" ;;
    413) hint=" (request body too large: MAX_BODY_BYTES)" ;;
    000) hint=" (no HTTP response)" ;;
  esac
  die "HTTP $code after ${seconds}s$hint: $body"
fi

if command -v node >/dev/null; then
  # Decode and inspect with node: exact JSON parsing, no jq/python needed.
  info=$(node -e '
    const fs = require("fs");
    const [resp, out] = process.argv.slice(1);
    let body;
    try { body = JSON.parse(fs.readFileSync(resp, "utf8")); } catch (e) { console.error("response is not JSON"); process.exit(3); }
    const b64 = body?.predictions?.[0]?.image?.b64;
    if (typeof b64 !== "string" || b64.length === 0) { console.error("no predictions[0].image.b64 in the response: " + JSON.stringify(body).slice(0, 300)); process.exit(3); }
    const buf = Buffer.from(b64, "base64");
    fs.writeFileSync(out, buf);
    const sig = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    if (buf.length < 24 || !buf.subarray(0, 8).equals(sig)) { console.error("decoded image is not a PNG (first bytes " + buf.subarray(0, 8).toString("hex") + "; OUTPUT_FORMAT?)"); process.exit(3); }
    if (buf.toString("latin1", 12, 16) !== "IHDR") { console.error("PNG without an IHDR chunk first"); process.exit(3); }
    console.log(buf.readUInt32BE(16) + " " + buf.readUInt32BE(20) + " " + buf.length + " " + body.predictions.length);
  ' "$resp" "$png") || die "bad response body"
  read -r width height bytes count <<<"$info"
else
  # Fallback without node: pull the b64 field out with sed, decode with base64, read bytes with od.
  b64=$(tr -d '\n' <"$resp" | sed -n 's/.*"b64"[[:space:]]*:[[:space:]]*"\([A-Za-z0-9+\/=]*\)".*/\1/p')
  [[ -n $b64 ]] || die "no predictions[0].image.b64 in the response: $(head -c 300 "$resp")"
  printf '%s' "$b64" | base64 -d >"$png" 2>/dev/null || die "image.b64 is not valid base64"
  sig=$(od -An -tx1 -N8 "$png" | tr -d ' \n')
  [[ $sig == 89504e470d0a1a0a ]] || die "decoded image is not a PNG (first bytes $sig; OUTPUT_FORMAT?)"
  [[ $(od -An -c -j12 -N4 "$png" | tr -d ' \n') == IHDR ]] || die "PNG without an IHDR chunk first"
  width=$((16#$(od -An -tx1 -j16 -N4 "$png" | tr -d ' \n')))
  height=$((16#$(od -An -tx1 -j20 -N4 "$png" | tr -d ' \n')))
  bytes=$(wc -c <"$png" | tr -d ' ')
  count=1
fi

expect_w=$(sed -n 's/.*"width"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$input" | head -1)
expect_h=$(sed -n 's/.*"height"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$input" | head -1)
if [[ -n ${OUTPUT:-} ]]; then cp "$png" "$OUTPUT"; fi
echo "OK: PNG ${width}x${height}, ${bytes} bytes, ${count} prediction(s), latency ${seconds}s${OUTPUT:+, saved to $OUTPUT}"
if [[ -n $expect_w && -n $expect_h && ( $width != "$expect_w" || $height != "$expect_h" ) ]]; then
  die "image is ${width}x${height}, the request asked for ${expect_w}x${expect_h}"
fi
