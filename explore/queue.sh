#!/bin/bash
# Run explore/train_y.py jobs one at a time from runs/explore2/queue.txt (one line of arguments per run;
# a line starting with "probe " runs explore/probe_sm.py instead). The first line is popped before it runs,
# so the file can be edited while the queue works.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
Q=runs/explore2/queue.txt
while [ -s "$Q" ]; do
  line=$(head -n 1 "$Q"); sed -i 1d "$Q"
  script=explore/train_y.py
  case "$line" in probe\ *) script=explore/probe_sm.py; line=${line#probe } ;; esac
  name=$(echo "$line" | sed -E 's/.*--name ([^ ]+).*/\1/')
  echo "$(date +%T) start $name: $script $line" >> runs/explore2/queue.log
  /work/main/.venv/bin/python $script $line > "runs/explore2/$name.log" 2>&1
  echo "$(date +%T) end $name rc=$?" >> runs/explore2/queue.log
done
