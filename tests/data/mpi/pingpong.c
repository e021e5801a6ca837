/* Ping-pong between rank 0 and the last rank: one-way latency (small messages) and
 * bandwidth (large messages).  Output is one parseable line per message size. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double pingpong(char *buf, int bytes, int iters, int rank, int peer, int active)
{
    double t0;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = MPI_Wtime();
    for (int i = 0; i < iters && active; i++) {
        if (rank == 0) {
            MPI_Send(buf, bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD);
            MPI_Recv(buf, bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(buf, bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD);
        }
    }
    return (MPI_Wtime() - t0) / (2.0 * iters);
}

int main(int argc, char **argv)
{
    int rank, size, peer, active;
    int sizes[] = {8, 1024, 65536, 1048576, 4194304};
    int iters = argc > 1 ? atoi(argv[1]) : 200;
    char *buf = malloc(4194304);

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    peer = rank == 0 ? size - 1 : 0;
    active = size > 1 && (rank == 0 || rank == size - 1);
    memset(buf, rank, 4194304);
    for (unsigned s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int n = sizes[s] >= 1048576 ? (iters / 10 > 2 ? iters / 10 : 2) : iters;
        pingpong(buf, sizes[s], n / 10 + 1, rank, peer, active); /* warm-up */
        double t = pingpong(buf, sizes[s], n, rank, peer, active);
        if (rank == 0)
            printf("pingpong bytes=%d latency_us=%.3f bandwidth_MBps=%.1f\n", sizes[s], t * 1e6,
                   sizes[s] / t / 1e6);
    }
    MPI_Finalize();
    free(buf);
    return 0;
}
