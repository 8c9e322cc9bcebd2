#!/usr/bin/env bash
# Renders the spoken voice replies kaiwa embeds (crates/kaiwa/assets/voice/*.wav) with espeak-ng,
# as 16 kHz mono 16-bit WAV, which every browser plays. Run it only to change the phrases; the
# clips are committed so that building kaiwa needs neither tool.
#   apt-get install espeak-ng sox
set -euo pipefail
out="$(cd "$(dirname "$0")/.." && pwd)/crates/kaiwa/assets/voice"
mkdir -p "$out"
render() {
  local name=$1 text=$2 tmp
  tmp=$(mktemp --suffix=.wav)
  espeak-ng -v en-us -s 155 -p 45 -w "$tmp" "$text"
  sox "$tmp" -r 16000 -c 1 -b 16 "$out/$name.wav" norm -1
  rm -f "$tmp"
  echo "$out/$name.wav: $(stat -c %s "$out/$name.wav") bytes"
}
render voice "Thanks for your voice message. I heard you loud and clear."
render video "Thanks for the video. Here is a picture for you."
render image "Nice picture! Here is one back for you."
