"""Prints what tf.distribute.MultiWorkerMirroredStrategy would read."""
import json
import os

config = json.loads(os.environ["TF_CONFIG"])
task = config["task"]
print(f"{task['type']} {task['index']} of cluster {config['cluster']}", flush=True)
