#!/bin/sh
# The image's entrypoint. With no arguments, or `serve [options]`: validate the config, then
# replace this shell with the proxy, so that `docker stop` (SIGTERM) and SIGHUP (reload) reach
# it. Anything else is a shardwire command (`health`, `check`, `demo-data`, `explain`, ...)
# run as given, with `--config` added when it names none.
#
#   SHARDWIRE_CONFIG   the config file (default /etc/shardwire/shardwire.yaml)
set -eu

config="${SHARDWIRE_CONFIG:-/etc/shardwire/shardwire.yaml}"

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve)
        shift
        # Every problem of the file at once, each with its key, before anything listens.
        shardwire check --config "$config" >&2
        exec shardwire serve --config "$config" "$@"
        ;;
    check | demo-data | ids | recover)
        command="$1"
        shift
        case " $* " in
            *" --config "* | *" --config="*) exec shardwire "$command" "$@" ;;
            *) exec shardwire "$command" --config "$config" "$@" ;;
        esac
        ;;
    health)
        shift
        case " $* " in
            *" --config "* | *" --config="* | *" --port "* | *" --port="*)
                exec shardwire health "$@" ;;
            *) exec shardwire health --config "$config" "$@" ;;
        esac
        ;;
    *)
        exec shardwire "$@"
        ;;
esac
