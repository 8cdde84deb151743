/*
 * ost-flood: make QEMU emit ACPI_DEVICE_OST events as fast as a guest can, or at a set rate.
 *
 * A hostile guest's view of QEMU's CPU hotplug registers (hw/acpi/cpu.c, q35 base 0x0cd8,
 * 12 ports): selector at +0 (32 bit), command at +5 (8 bit), data at +8 (32 bit). With the
 * command CPHP_OST_EVENT_CMD (1) a data write sets the slot's _OST source; with
 * CPHP_OST_STATUS_CMD (2) every data write sets its status and sends one ACPI_DEVICE_OST.
 * QEMU does not rate-limit the event. The lab kernel has no /dev/port: ioperm() it is.
 *
 *   ost-flood RATE SECONDS [SELECTOR [SOURCE [STATUS [STATUSFILE]]]]
 *
 * RATE events/s (0: full speed), SECONDS the bound on the run (1..3600). Defaults fake a
 * hot-add of slot 1 (vcpu1: source 1 device check, status 0 success); the event names the
 * device only while that slot's vCPU is plugged. Writes "sent=N seconds=S" to STATUSFILE
 * (default /run/vhp/flood.status) every 0.25 s and at the end (also on SIGTERM/SIGINT).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>
#include <time.h>

#define BASE 0x0cd8
#define SPAN 12
#define BATCH 64 /* writes between two clock reads */

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *path, unsigned long long sent, double seconds)
{
	FILE *f = fopen(path, "w");
	if (f) {
		fprintf(f, "sent=%llu seconds=%.2f\n", sent, seconds);
		fclose(f);
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s RATE SECONDS [SELECTOR [SOURCE [STATUS [FILE]]]]\n", argv[0]);
		return 2;
	}
	double rate = atof(argv[1]), bound = atof(argv[2]);
	unsigned selector = argc > 3 ? strtoul(argv[3], NULL, 0) : 1;
	unsigned source = argc > 4 ? strtoul(argv[4], NULL, 0) : 1;
	unsigned status = argc > 5 ? strtoul(argv[5], NULL, 0) : 0;
	const char *file = argc > 6 ? argv[6] : "/run/vhp/flood.status";
	if (rate < 0 || bound <= 0 || bound > 3600) {
		fprintf(stderr, "ost-flood: RATE >= 0, 0 < SECONDS <= 3600\n");
		return 2;
	}
	if (ioperm(BASE, SPAN, 1) != 0) {
		perror("ost-flood: ioperm");
		return 1;
	}
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	outl(selector, BASE + 0);
	outb(1, BASE + 5); /* CPHP_OST_EVENT_CMD: the next data write is the source */
	outl(source, BASE + 8);
	outb(2, BASE + 5); /* CPHP_OST_STATUS_CMD: every data write is one event */
	unsigned long long sent = 0;
	double start = now(), last = start, t = start;
	struct timespec pause = {0, 500000};
	while (!stopping && t - start < bound) {
		/* Paced: catch up with RATE * elapsed, then sleep; full speed: never sleep. */
		unsigned long long due = rate > 0 ? (unsigned long long)(rate * (t - start)) : sent + BATCH;
		for (int i = 0; i < BATCH && sent < due; i++, sent++)
			outl(status, BASE + 8);
		if (rate > 0 && sent >= due)
			nanosleep(&pause, NULL);
		t = now();
		if (t - last >= 0.25) {
			report(file, sent, t - start);
			last = t;
		}
	}
	report(file, sent, t - start);
	return 0;
}
