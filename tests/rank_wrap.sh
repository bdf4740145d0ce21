#!/bin/sh
# One rank's command under mlx.launch, keeping its pid, stdout, stderr and exit code in DIR
# by rank (mlx.launch may exit 0 when a rank failed).
dir=$1
shift
"$@" > "$dir/out.$MLX_RANK" 2> "$dir/err.$MLX_RANK" &
child=$!
echo "$child" > "$dir/pid.$MLX_RANK"
wait "$child"
echo $? > "$dir/rc.$MLX_RANK"
