#ifndef SUSPEND_H
#define SUSPEND_H
#include "os.h"

/* Xen's cooperative suspend, guest side. suspend_init() watches
 * control/shutdown; suspend_check(deadline) waits (until deadline_ns, 0 = no
 * wait) for a "suspend" request and performs it. Returns -1 when nothing was
 * requested, 0 after a resume in a new domain (everything re-initialised), 1
 * after a cancelled suspend (same domain). `resume_hook` is called after a
 * resume in a new domain (rebind event channels there). */
int suspend_init(void (*resume_hook)(void));
int suspend_check(u64 deadline_ns);
long do_suspend(void);
extern unsigned long bad_start_info;
extern int refuse_suspend;
extern unsigned long suspend_delay_ms;

#endif
