/* The pod sandbox of the real test node (tests/k8s/images.py): holds the pod's namespaces,
 * reaps orphaned children, exits on SIGINT/SIGTERM — what registry.k8s.io/pause does. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

static void quit(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
