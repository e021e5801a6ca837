/* Allreduce timing: the mean time of MPI_Allreduce over doubles, checked for the
 * right answer so a broken transport cannot pass as a fast one. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    int rank, size, count = argc > 2 ? atoi(argv[2]) : 65536;
    int iters = argc > 1 ? atoi(argv[1]) : 100;
    double *in, *out, t0, t;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    in = malloc(count * sizeof *in);
    out = malloc(count * sizeof *out);
    for (int i = 0; i < count; i++)
        in[i] = rank + 1;
    MPI_Allreduce(in, out, count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = MPI_Wtime();
    for (int i = 0; i < iters; i++)
        MPI_Allreduce(in, out, count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    t = (MPI_Wtime() - t0) / iters;
    if (rank == 0)
        printf("allreduce doubles=%d ranks=%d time_us=%.3f correct=%d\n", count, size, t * 1e6,
               out[0] == size * (size + 1) / 2.0 && out[count - 1] == out[0]);
    MPI_Finalize();
    return 0;
}
