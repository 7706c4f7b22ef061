#!/bin/sh
echo "$GREETING"
cat /app/build-info.txt
echo "running as $(id -un) on $(uname -sr), hostname $(hostname)"
