/* probe: one operation inside a container, its result and errno on stdout ("RESULT ERRNO").
 * Built static by the attack tests (tests/test_e2e_attacks.py), so it needs nothing of the
 * image; in the manner of bubblewrap's tests/try-syscall.c.
 *
 *   probe NUMBER [ARG]...          the system call NUMBER with up to six integer arguments
 *   probe int80 NUMBER             the same through the i386 entry (int $0x80), no arguments
 *   probe open PATH r|w            open(2) a file for reading or writing, read or write 1 byte
 *   probe mknod PATH b|c MAJ MIN   mknod(2) a device node
 *   probe forkbomb                 fork until it fails; prints how many, and the errno
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int report(long result, int error)
{
    printf("%ld %d\n", result, result < 0 ? error : 0);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "int80")) {
#if defined(__x86_64__)
        long r, nr = strtol(argv[2], NULL, 0);
        __asm__ volatile ("int $0x80" : "=a"(r) : "a"(nr) : "memory");
        return report(r < 0 ? -1 : r, (int)-r);
#else
        return report(-1, ENOSYS);
#endif
    }
    if (argc == 4 && !strcmp(argv[1], "open")) {
        char c = 'x';
        int fd = open(argv[2], argv[3][0] == 'w' ? O_WRONLY : O_RDONLY);
        if (fd < 0)
            return report(-1, errno);
        long n = argv[3][0] == 'w' ? write(fd, &c, 1) : read(fd, &c, 1);
        return report(n, errno);
    }
    if (argc == 6 && !strcmp(argv[1], "mknod")) {
        mode_t kind = argv[3][0] == 'b' ? S_IFBLK : S_IFCHR;
        dev_t dev = makedev(atoi(argv[4]), atoi(argv[5]));
        int r = mknod(argv[2], kind | 0600, dev);
        return report(r, errno);
    }
    if (argc == 2 && !strcmp(argv[1], "forkbomb")) {
        long n = 0;
        for (;;) {
            pid_t pid = fork();
            if (pid == 0) {
                pause();
                _exit(0);
            }
            if (pid < 0)
                break;
            n++;
        }
        report(n, 0);
        printf("%d\n", errno);
        fflush(stdout);
        kill(0, SIGKILL);           /* the whole bomb, this process included */
        return 0;
    }
    if (argc < 2)
        return 2;
    long a[6] = {0};
    long nr = strtol(argv[1], NULL, 0);
    for (int i = 2; i < argc && i < 8; i++)
        a[i - 2] = (long)strtoul(argv[i], NULL, 0);
    errno = 0;
    long r = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    return report(r, errno);
}
