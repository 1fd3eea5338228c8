"""Every rank adds its rank into an allreduce and says where it ran."""
import os
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank(), op=MPI.SUM)
# The address this rank's node is reached at (the node's own).
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect((os.environ["AZ_BATCHAI_MPI_MASTER_NODE"], 9))
print(
    f"rank {comm.Get_rank()} of {comm.Get_size()} on {probe.getsockname()[0]}: "
    f"allreduce of ranks = {total}",
    flush=True,
)
