/* MPI hello world for mesobox's Slurm tests: each rank reports where it runs and
 * whether it sees the container's marker file, so a test can prove both the rank
 * layout and that the rank ran inside the image. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, len, sum = 0;
    char name[MPI_MAX_PROCESSOR_NAME];
    FILE *marker;
    char tag[64] = "none";

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(name, &len);
    marker = fopen("/etc/mesobox-mpi-image", "r");
    if (marker) {
        if (!fgets(tag, sizeof tag, marker))
            tag[0] = 0;
        fclose(marker);
        for (char *p = tag; *p; p++)
            if (*p == '\n')
                *p = 0;
    }
    /* A collective proves the ranks really talk to each other. */
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("hello rank=%d size=%d node=%s slurm_node=%s image=%s ranksum=%d\n", rank, size, name,
           getenv("SLURMD_NODENAME") ? getenv("SLURMD_NODENAME") : "-", tag, sum);
    MPI_Finalize();
    return 0;
}
