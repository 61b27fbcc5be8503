#!/bin/sh
# Make the working folder a git + DVC project on first start (the image ships params.yaml,
# dvc.yaml and the DVC remote configuration), then run the command.
set -e
if [ ! -f params.yaml ]; then
    cp -r "${GAMMA_PROJECT_TEMPLATE:-/opt/gamma/project}/." .
fi
if [ ! -d .git ]; then
    git init -q
    git config user.email gamma@localhost
    git config user.name gamma
fi
exec "$@"
