# bash completion for virthotplug(1)                                  -*- shell-script -*-
# Installed as /usr/share/bash-completion/completions/virthotplug.
# Commands and options are listed here; a test keeps the lists in sync with the parser.

_virthotplug_commands="status check watch policy apply setvcpus help"
_virthotplug_global="-h --help -c --connect -r --readonly --config-file -d --debug -q --quiet --version"
_virthotplug_status="-h --help --all --agent-timeout --json --qemu-monitor"
_virthotplug_check="-h --help --all --agent-timeout"
_virthotplug_watch="-h --help --json --resync-interval --agent-timeout --workers --hotadd-settle --domain --no-hook-socket --metrics-listen"
_virthotplug_policy="-h --help --json --set --clear --count --grace --exclude --retries --live --config --current"
_virthotplug_apply="-h --help --all --agent-timeout --dry-run --json"
_virthotplug_help="-h --help"
_virthotplug_setvcpus="-h --help --live --config --current --maximum --guest --override-policy --hotpluggable --timeout --online --no-online --force --json"
# Options followed by a value.
_virthotplug_with_value="-c --connect -d --debug --config-file --agent-timeout --resync-interval --workers --hotadd-settle --set --count --grace --exclude --retries --timeout --metrics-listen --domain"
# Commands and how many DOMAIN arguments they take (0: any number).
_virthotplug_domains="status:0 check:0 apply:0 policy:1 setvcpus:1"

# Domain names through virsh (read-only) on the connection given with -c/--connect.
_virthotplug_domain_names()
{
    local -a args=(-q -r)
    [[ -n $1 ]] && args+=(-c "$1")
    timeout 5 virsh "${args[@]}" list --all --name 2>/dev/null
}

_virthotplug()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null 2>&1; then
        _init_completion -n =: || return # URIs keep their ':' and '='
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    case $prev in
        --config-file)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
        --set)
            mapfile -t COMPREPLY < <(compgen -W "online match report ignore" -- "$cur")
            return
            ;;
    esac
    case $prev in
        -d | --debug)
            mapfile -t COMPREPLY < <(compgen -W "0 1 2 3 4" -- "$cur")
            # The level is optional: a command may follow -d at once.
            [[ $cur == [0-4] || -z $cur ]] && return
            mapfile -t COMPREPLY < <(compgen -W "$_virthotplug_commands" -- "$cur")
            return
            ;;
    esac
    local opt
    for opt in $_virthotplug_with_value; do
        [[ $prev == "$opt" ]] && return # a URI, a number, a cpulist: nothing to offer
    done

    # Find the command (the first word that is neither an option nor an option's value),
    # the connection URI, and how many positional arguments follow the command.
    local command="" uri="" positionals=0 i=1 word
    while ((i < cword)); do
        word=${words[i]}
        case $word in
            -c | --connect) uri=${words[i + 1]} ;;
            --connect=*) uri=${word#--connect=} ;;
        esac
        if [[ $word == -d || $word == --debug ]] && [[ ${words[i + 1]} != [0-9]* ]]; then
            ((i++)) # -d without its optional level
            continue
        fi
        case " $_virthotplug_with_value " in
            *" $word "*)
                ((i += 2))
                continue
                ;;
        esac
        if [[ $word != -* ]]; then
            if [[ -z $command ]]; then
                command=$word
            else
                ((positionals++))
            fi
        fi
        ((i++))
    done

    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$_virthotplug_global" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "$_virthotplug_commands" -- "$cur")
        fi
        return
    fi

    local options_var="_virthotplug_${command}"
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${!options_var}" -- "$cur")
        return
    fi
    if [[ $command == help ]]; then
        ((positionals == 0)) && mapfile -t COMPREPLY < <(compgen -W "$_virthotplug_commands" -- "$cur")
        return
    fi
    local entry limit=""
    for entry in $_virthotplug_domains; do
        [[ ${entry%%:*} == "$command" ]] && limit=${entry#*:}
    done
    if [[ -n $limit ]] && ((limit == 0 || positionals < limit)); then
        local IFS=$'\n'
        mapfile -t COMPREPLY < <(compgen -W "$(_virthotplug_domain_names "$uri")" -- "$cur")
    fi
}

complete -F _virthotplug virthotplug
