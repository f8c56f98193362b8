/* aiovmm KVM slice runner, built by `make setup` (aiovmm/_native/kvm.so).
 *
 * Why C: a slice must end on time even when the guest never exits (a CPU-bound loop runs
 * natively under KVM). A per-thread POSIX timer sends AIOVMM_KICK_SIGNAL to the event-loop
 * thread (or to the engine's vCPU thread, which then makes every KVM_RUN: see
 * aiovmm_kvm_thread_new below); its handler, which must be async-signal-safe and cannot be a Python handler (those
 * run later, after KVM_RUN has returned), sets kvm_run.immediate_exit. That covers both
 * races: a signal during KVM_RUN makes it return -EINTR; a signal that lands just before
 * the ioctl makes KVM_RUN return at once instead of running a whole extra slice.
 *
 * Exits are handled in Python (aiovmm/kvm_engine.py), but for a few completed here, each
 * under the conditions of its function: repeated PIT reads (fast_in), the hypercalls whose
 * whole effect is vCPU state (fast_hypercall; an iret to a 64-bit code segment of the
 * guest's GDT page 0: iret_cs64), two queries whose answer never changes (fast_query),
 * the event upcall after a hypercall completed here (fast_upcall), and a user process's
 * system call bounced to
 * the guest kernel (fast_user_syscall). Python's handler of each stays the reference: any
 * case not proven here to be one it handles the same way is left to it. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KVM_RUN_IOCTL 0xAE80
#define KVM_CREATE_VM_IOCTL 0xAE01
#define KVM_CREATE_VCPU_IOCTL 0xAE41
#define KVM_SET_USER_MEMORY_REGION_IOCTL 0x4020AE46
#define KVM_SET_CPUID2_IOCTL 0x4008AE90
#define AIOVMM_KICK_SIGNAL (SIGRTMIN + 7)

static __thread volatile uint8_t *cur_immediate_exit;

static void kick_handler(int sig)
{
    (void)sig;
    volatile uint8_t *p = cur_immediate_exit;
    if (p)
        *p = 1;
}

/* Install the handler (once per process) and create a timer that signals the calling
 * thread. Returns 0 and stores the timer id, or -errno. */
int aiovmm_kvm_timer_create(timer_t *out)
{
    static int installed;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kick_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;                /* no SA_RESTART: KVM_RUN must return -EINTR */
        if (sigaction(AIOVMM_KICK_SIGNAL, &sa, NULL) < 0)
            return -errno;
        installed = 1;
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = AIOVMM_KICK_SIGNAL;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, out) < 0)
        return -errno;
    return 0;
}

int aiovmm_kvm_timer_delete(timer_t t)
{
    return timer_delete(t) < 0 ? -errno : 0;
}

/* A slice: arm the timer once at the slice's absolute CLOCK_MONOTONIC deadline, then any
 * number of aiovmm_kvm_run() calls (one per exit handled in Python), then end it. A kick that
 * lands while Python handles an exit makes the next KVM_RUN return -EINTR at once, so the
 * per-exit cost is one ioctl, not two timer_settime calls around it. */
int aiovmm_kvm_slice_begin(uint8_t *run, timer_t timer, int64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    run[1] = 0;
    cur_immediate_exit = run + 1;
    its.it_value.tv_sec = deadline_ns / 1000000000;
    its.it_value.tv_nsec = deadline_ns % 1000000000;
    if (timer_settime(timer, TIMER_ABSTIME, &its, NULL) < 0) {
        cur_immediate_exit = NULL;
        return -errno;
    }
    return 0;
}

int aiovmm_kvm_slice_end(uint8_t *run, timer_t timer)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    timer_settime(timer, 0, &its, NULL);
    cur_immediate_exit = NULL;
    run[1] = 0;
    return 0;
}

/* Take the slice's kick: clear kvm_run.immediate_exit and return what it was, in one
 * instruction (an xchg), so that the kick handler, which runs on this same thread between
 * any two instructions, cannot set it between a read and a clear that would lose it. Used
 * before the engine runs its own ring-0 stub inside a slice (aiovmm/kvm_engine.py
 * _invalidate): the stub must run even if the slice's timer has fired, and the kick must
 * be put back afterwards, or the guest's next KVM_RUN has neither a kick nor a timer left. */
int aiovmm_kvm_take_kick(uint8_t *run)
{
    return __atomic_exchange_n(run + 1, 0, __ATOMIC_SEQ_CST);
}

/* One KVM_RUN. Returns 0 after an exit the caller handles (run->exit_reason), -EINTR when
 * the slice's deadline kicked the vCPU out, or -errno. */
int aiovmm_kvm_run(int vcpu_fd)
{
    return ioctl(vcpu_fd, KVM_RUN_IOCTL, 0) < 0 ? -errno : 0;
}

#define AIOVMM_FAST_IN_MAX 4

/* The engine's per-vCPU run context (aiovmm/kvm_engine.py _RunCtx, same layout). */
struct aiovmm_kvm_ctx {
    int32_t vcpu_fd;
    int32_t hcall_port;
    uint8_t *run;
    uint64_t stubs_lo, stubs_hi;   /* RIP range of the ring-0 vector stubs */
    uint64_t exits;                /* KVM_RUN calls made through here */
    timer_t timer;                 /* the slice timer (aiovmm_kvm_slice_begin) */
    int64_t grace_ns;              /* if set: re-arm the slice's end this long after entry */
    int32_t syscall_port;          /* the SYSCALL entry page's `out` ... */
    int32_t pad;
    uint64_t syscall_va;           /* ... at this RIP range (syscall_va .. +2) */
    /* Plain one-byte INs answered here (see aiovmm_kvm_run_ex): filled by the engine after
     * the shared port policy answered the same IN all ones, emptied by it at every other
     * exit it handles (and here at every other return but a slice's end: the engine checks
     * the table at the next slice's start, kvm_engine.py _keep_port_answers). */
    uint64_t mem_base;             /* host address of machine address 0 (memory slot 0) */
    uint64_t run_size;             /* bytes of the kvm_run mapping (the IN's data lies in it) */
    uint32_t fast_n, fast_next;
    uint64_t fast_hits;            /* INs answered here */
    struct {
        uint64_t rip;              /* the instruction's RIP ... */
        uint64_t maddr;            /* ... its machine address (both bytes in one frame) */
        uint32_t port, pad;
    } fast[AIOVMM_FAST_IN_MAX];
    /* The return to CPL 3 after an exit (aiovmm_kvm_back_to_cpl3): kvm_segment images. */
    uint8_t cs64[24], cs32[24], ss3[24];
    /* Hypercalls completed here (see fast_hypercall): the vCPU's PV state, owned by this
     * struct and read by Python through it (aiovmm/vcpu.py PVState), or NULL; fast_hc is
     * cleared by the engine whenever Python must see every exit (single-stepping, a domain
     * shutting down). */
    struct aiovmm_pv *pv;
    uint32_t fast_hc;
    uint32_t page_rip_after;       /* a hypercall page exit has RIP past its `out` (kvm-pvm) */
    uint64_t mem_size;             /* bytes of machine memory at mem_base */
    uint64_t fast_calls[4];        /* stack_switch, set_segment_base, iret, vcpu_op completed here */
    /* The armed slice's end (CLOCK_MONOTONIC ns; 0: no slice). No guest entry here past it:
     * if a kick was lost anyway, the guest is not entered without a timer left to end it. */
    int64_t deadline_ns;
    /* The page-table roots C may load as CR3 (a switch between guest kernel and user mode):
     * set by the engine after each shadow-guard check to the vCPU's kernel and user L4 if
     * the guard tracks them and defers nothing (aiovmm/kvm_engine.py _kvm_run), else 0. A
     * root that differs from the vCPU's current one (pv) is not loaded here: Python's. */
    uint64_t ready_kroot, ready_uroot;
    uint64_t fast_bounces;         /* user-mode syscalls bounced to the guest kernel here */
    uint64_t fast_user_irets;      /* of fast_calls[2]: irets back to guest user mode */
    uint64_t fast_page;            /* of fast_calls: those made through the hypercall page */
    uint64_t fast_queries[2];      /* fast_query: xen_version(XENVER_version), vcpu_op of no vCPU */
    uint64_t r0_stack_va, r0_stack_maddr;   /* the ring-0 stack page the CPU's frames go to */
    uint64_t fast_cli_sti;         /* #GP(0) at cli/sti completed here (fast_cli_sti) */
    uint64_t fast_upcalls;         /* event upcalls bounced here after a hypercall (fast_upcall) */
    /* The CS image fast_iret last loaded from the guest's GDT and cpl3_cs_set = 1: the
     * engine's hidden part for that selector at its returns to CPL 3 (aiovmm/kvm_engine.py
     * _back_to_cpl3 takes it and clears the flag; KVMEngine.load_segment clears it). */
    uint8_t cpl3_cs[24];
    uint32_t cpl3_cs_set, pad3;
    /* Exit census (bench/net_exits.py), NULL: off. Each KVM_RUN's outcome adds one to
     * census[census_key()]: AIOVMM_CENSUS_N counters, keys in aiovmm/kvm_engine.py Census. */
    uint64_t *census;
    /* As cpl3_cs, for SS: the image fast_iret last loaded from the guest's GDT and
     * cpl3_ss_set = 1 (aiovmm/kvm_engine.py _back_to_cpl3 takes it; load_segment clears it). */
    uint8_t cpl3_ss[24];
    uint32_t cpl3_ss_set, pad4;
};

/* Xen's per-vCPU PV state that a hypercall completed here reads or writes (aiovmm/vcpu.py
 * PVState, same layout; the VCPU's attributes of these names are views of it). */
struct aiovmm_pv {
    uint8_t kernel_mode, iopl, pad[6];   /* iopl: the virtual IOPL 0..3 */
    uint64_t kernel_ss, kernel_sp; /* HYPERVISOR_stack_switch */
    uint64_t info_maddr;           /* this vCPU's vcpu_info (machine address) */
    uint64_t fault_depth;          /* nested faults since the last hypercall (traps.py) */
    uint64_t hypercalls;
    uint64_t kernel_root;          /* MFN of the guest kernel's L4 (MMUEXT_NEW_BASEPTR) */
    uint64_t user_root;            /* MFN of the guest user L4 (MMUEXT_NEW_USER_BASEPTR), 0: none */
    uint64_t kernel_gs_base;       /* GS base of the mode not running (Xen's gs_base_kernel/_user): */
    uint64_t user_gs_base;         /* the live one is kvm_sregs gs.base */
    uint64_t last_frame_rsp;       /* the last bounce frame (traps.py: nested-fault detection) */
    uint64_t syscall_cb;           /* CALLBACKTYPE_syscall: address (0: none) ... */
    uint64_t syscall_cb_flags;     /* ... and flags (CALLBACKF_mask_events) */
    /* The singleshot timer (fast_vcpu_op). The timer itself is the event loop's (it must
     * fire while the vCPU is blocked or descheduled): C only records the last change it
     * made, sshot_op (SSHOT_SET at sshot_deadline, SSHOT_STOP; 0 none since Python last
     * applied one), and Python applies it when it takes the completed calls
     * (aiovmm/timers.py apply_engine_singleshot) or drops it when it sets the timer itself. */
    uint32_t vcpu_id;              /* this vCPU's id (VCPUOP_*_singleshot_timer name only it) */
    uint32_t sshot_op;
    uint64_t sshot_deadline;       /* Xen system time (ns) */
    int64_t clock_origin_ns;       /* system time = CLOCK_MONOTONIC - this (aiovmm/clock.py) */
    uint64_t vm_assist_ptr;        /* the domain's vm_assist word (aiovmm/domain.py), 0: none */
    /* Answers fast_query gives, each the Python handler's own result stored by Python
     * (aiovmm/vcpu.py VCPU.__init__), so values and error codes come from one place; 0: that
     * query is Python's. */
    uint64_t xenver_version;       /* RAX of xen_version(XENVER_version) */
    uint64_t no_vcpu;              /* RAX of vcpu_op(any cmd, vcpuid >= max_vcpus): -ENOENT */
    uint32_t max_vcpus;            /* vCPU ids at or above it name no vCPU of any domain */
    uint32_t pad2;
    uint64_t gdt_frame0;           /* the guest's first GDT frame (VCPU.gdt_frames) ... */
    uint64_t gdt_frames_nr;        /* ... and how many it gave (0: none) */
    uint64_t event_cb;             /* CALLBACKTYPE_event: address (0: none) */
};

#define KREG_RAX 0
#define KREG_RCX 2
#define KREG_RSI 4
#define KREG_RDI 5
#define KREG_R11 11
#define KREG_RIP 16
#define KREG_RFLAGS 17
#define RUN_DIRTY 296
#define RUN_REGS 304
#define RUN_SREGS 448
#define SYNC_REGS 1
#define SYNC_SREGS 2
#define RF_IOPL 0x3000ULL
#define RF_NT 0x4000ULL
#define RF_VM 0x20000ULL
#define HC_STACK_SWITCH 3
#define HC_SET_SEGMENT_BASE 25
#define HC_IRET 23
#define HC_VCPU_OP 24
#define HC_XEN_VERSION 17
#define XENVER_VERSION 0              /* xen/include/public/version.h */
#define VCPUOP_SET_SINGLESHOT 8       /* xen/include/public/vcpu.h */
#define VCPUOP_STOP_SINGLESHOT 9
#define SSHOT_SET 1                   /* aiovmm_pv.sshot_op (aiovmm/timers.py EngineTimerOp) */
#define SSHOT_STOP 2
#define KREG_RDX 3
#define KREG_RSP 6
#define PTE_PRESENT 1ULL
#define PTE_USER 4ULL
#define PTE_FRAME 0x000FFFFFFFFFF000ULL
#define AD_BITS 0x60ULL                /* accessed/dirty: KVM sets them in guest entries */
#define XEN_VIRT_START 0xFFFF800000000000ULL   /* Xen's range: never a guest address */
#define XEN_VIRT_END 0xFFFF880000000000ULL
#define VGCF_IN_SYSCALL 0x100ULL
#define RF_IF 0x200ULL
#define ARCH_FLAGS 0x3F7FD7ULL
#define SEGBASE_FS 0
#define SEGBASE_GS_KERNEL 2   /* xen/include/public/arch-x86/xen-x86_64.h */
#define VCPU_INFO_PENDING 0
#define VCPU_INFO_MASK 1
#define PTE_RW 2ULL
#define RF_TF 0x100ULL
#define RF_DF 0x400ULL
#define RF_RF 0x10000ULL
#define RF_AC 0x40000ULL
#define SREG_GS 4                     /* kvm_sregs: the 24-byte segment index of GS */
#define SREG_SS 5                     /* ... and of SS */
#define SREG_CR3 240
#define USER_CS 0xE033ULL             /* FLAT_RING3_CS64 / FLAT_RING3_SS (traps.py USER_CS/_SS) */
#define USER_SS 0xE02BULL
#define FLAT_RING3_CS32 0xE023ULL     /* compatibility mode (abi.FLAT_RING3_CS32) */
#define CALLBACKF_MASK_EVENTS 1ULL
#define BOUNCE_FRAME 56               /* rcx r11 rip cs rflags rsp ss: no error code */

struct aiovmm_guard;
static size_t guard_size(void);

/* The layouts Python mirrors (aiovmm/kvm_engine.py _RunCtx, aiovmm/vcpu.py PVState,
 * _GuardArgs), checked when the library is loaded: 0 the run context's size, 1 the PV
 * state's, 2 the shadow guard's arguments'. */
/* Exit census keys (census_note below). */
#define CK_REASON 0
#define CK_KICK 32
#define CK_PORT 33
#define CK_SYSCALL32 34
#define CK_VIA_PAGE 35     /* not an exit of its own: of the CK_HC ones, those through the page */
#define CK_HC 64
#define CK_USER (CK_HC + 64 * 64)
#define CK_VEC (CK_USER + 512)
#define AIOVMM_CENSUS_N (CK_VEC + 256)

size_t aiovmm_kvm_layout(int which)
{
    return which == 3 ? AIOVMM_CENSUS_N : which == 0 ? sizeof(struct aiovmm_kvm_ctx) : which == 1 ? sizeof(struct aiovmm_pv)
        : guard_size();
}

static int canonical(uint64_t a)
{
    return (uint64_t)((int64_t)(a << 16) >> 16) == a;
}

static uint64_t *regs_of(uint8_t *run) { return (uint64_t *)(run + RUN_REGS); }
static void mark_dirty(uint8_t *run, uint64_t bits) { *(uint64_t *)(run + RUN_DIRTY) |= bits; }

/* CS and SS back to CPL-3 state after an exit taken through ring 0 (a vector stub) or the
 * SYSCALL entry page: the 64-bit user code segment, or the 32-bit one when `cs32`, and the
 * user stack segment. kvm-pvm keeps CS/SS at CPL 3 across SYSCALL: then nothing is written
 * and the next entry carries no KVM_SET_SREGS (only the registers are marked dirty). */
void aiovmm_kvm_back_to_cpl3(struct aiovmm_kvm_ctx *c, int cs32)
{
    uint8_t *s = c->run + RUN_SREGS;
    const uint8_t *cs = cs32 ? c->cs32 : c->cs64;
    if (memcmp(s, cs, 24) == 0 && memcmp(s + 5 * 24, c->ss3, 24) == 0) {
        mark_dirty(c->run, SYNC_REGS);
        return;
    }
    memcpy(s, cs, 24);
    memcpy(s + 5 * 24, c->ss3, 24);
    mark_dirty(c->run, SYNC_REGS | SYNC_SREGS);
}

/* The SYSCALL entry page's exit: the guest's `syscall` left its return RIP in RCX and its
 * RFLAGS in R11. R11 is the guest's RFLAGS only for a real SYSCALL; a guest may also jump to
 * the entry page with any R11, so IOPL, VM and NT are never taken from it, nor reserved bits
 * (a real RFLAGS has none; hardware KVM fails the VM entry on them), and IF is set: Xen
 * returns to a PV guest with IF set on every path (x86_64/entry.S restore_all_guest). */
void aiovmm_kvm_syscall_entry(struct aiovmm_kvm_ctx *c)
{
    uint64_t *r = regs_of(c->run);
    r[KREG_RIP] = r[KREG_RCX];
    r[KREG_RFLAGS] = (r[KREG_R11] & ARCH_FLAGS & ~(RF_IOPL | RF_VM | RF_NT)) | RF_IF | 2;
    aiovmm_kvm_back_to_cpl3(c, 0);
}


/* Bits a page-table entry may not set (aiovmm/mmu.py WALK_RSVD, WALK_RSVD_UPPER: Xen's
 * guest_rsvd_bits for the advertised 40 address bits, cpuid.py PADDR_BITS), and PSE above
 * the L1 (reserved in L4 and L3; no PV guest table holds an L2 superpage). */
#define PTE_RSVD 0x000FFF0000000000ULL
#define PTE_PSE 0x80ULL
#define NO_MADDR UINT64_MAX

/* The machine address of guest VA `va` for a CPL-3 read (or, `write`, a write) through the
 * page tables at `cr3`, as Python's PageTables.translate finds it for copy_from_guest and
 * copy_to_guest: never Xen's range (access_ok), then aiovmm/mmu.py `walk`'s rule, which this
 * is tested against exhaustively (tests/test_ptwalk_property.py): canonical; at every level
 * present, user (and writable), no reserved bit, no PSE above the L1; every table and the
 * page inside machine memory. NO_MADDR otherwise (the caller leaves the call to Python, whose
 * walk then gives the fault). Each entry is read once. */
static uint64_t guest_maddr(struct aiovmm_kvm_ctx *c, uint64_t cr3, uint64_t va, int write)
{
    if (!canonical(va) || (va >= XEN_VIRT_START && va < XEN_VIRT_END))
        return NO_MADDR;
    uint64_t need = PTE_PRESENT | PTE_USER | (write ? PTE_RW : 0);
    uint64_t table = cr3 & PTE_FRAME;
    if (table >= c->mem_size)
        return NO_MADDR;
    for (int shift = 39; shift >= 12; shift -= 9) {
        uint64_t e;
        memcpy(&e, (const void *)(uintptr_t)(c->mem_base + table + 8 * ((va >> shift) & 0x1FF)), 8);
        uint64_t rsvd = shift == 12 ? PTE_RSVD : PTE_RSVD | PTE_PSE;
        table = e & PTE_FRAME;
        if ((e & need) != need || (e & rsvd) || table >= c->mem_size)
            return NO_MADDR;
    }
    return table | (va & 0xFFF);
}

/* guest_maddr for tests/test_ptwalk_property.py, which compares it with mmu.walk. */
uint64_t aiovmm_kvm_guest_maddr(struct aiovmm_kvm_ctx *c, uint64_t cr3, uint64_t va, int write)
{
    return guest_maddr(c, cr3, va, write);
}

/* The root `mfn` of this vCPU (its current kernel or user L4) may be loaded as CR3 here: the
 * engine found the shadow guard tracking it with nothing deferred (ready_kroot/ready_uroot),
 * so the switch needs none of the work Python's CR3 load triggers (aiovmm/kvm_engine.py
 * _kvm_run: KVM may only shadow tracked tables; a CR3 load flushes deferred entries). */
static int root_ready(uint64_t mfn, uint64_t ready)
{
    return mfn != 0 && mfn == ready;
}

#define VMASST_ARCHITECTURAL_IOPL 4

/* VMASST_TYPE_architectural_iopl (aiovmm/emulate.py architectural_iopl), read from the
 * domain's one vm_assist word. Only with it does an iret frame set the virtual IOPL and a
 * bounce frame carry it (Xen: pv/iret.c do_iret, create_bounce_frame); without it (Linux:
 * PHYSDEVOP_set_iopl 1, no VMASST) both ignore it. No word known: as if set (Python's). */
static int architectural_iopl(const struct aiovmm_pv *pv)
{
    const volatile uint64_t *a = (const volatile uint64_t *)(uintptr_t)pv->vm_assist_ptr;
    return !a || ((*a >> VMASST_ARCHITECTURAL_IOPL) & 1);
}

/* Xen's toggle_guest_mode as vcpu.py switch_to_kernel / switch_to_user do it: the live GS
 * base is saved as the leaving mode's, the entered mode's loaded, CR3 set to its root (a
 * root_ready one: the caller checked). */
static void toggle_mode(struct aiovmm_kvm_ctx *c, int to_kernel)
{
    struct aiovmm_pv *pv = c->pv;
    uint8_t *s = c->run + RUN_SREGS;
    uint64_t gs, cr3;
    memcpy(&gs, s + SREG_GS * 24, 8);
    if (to_kernel) {
        pv->user_gs_base = gs;
        gs = pv->kernel_gs_base;
        cr3 = pv->kernel_root << 12;
    } else {
        pv->kernel_gs_base = gs;
        gs = pv->user_gs_base;
        cr3 = pv->user_root << 12;
    }
    pv->kernel_mode = (uint8_t)to_kernel;
    memcpy(s + SREG_GS * 24, &gs, 8);
    memcpy(s + SREG_CR3, &cr3, 8);
    mark_dirty(c->run, SYNC_SREGS);
}

#define SEG_ACCESSED (1u << 8)
#define SEG_CODE (1u << 11)
#define SEG_CONFORMING (1u << 10)
#define SEG_S (1u << 12)
#define SEG_DPL (3u << 13)
#define SEG_P (1u << 15)
#define SEG_L (1u << 21)
#define SEG_DB (1u << 22)

/* The descriptor a selector names in the guest's first GDT page (VCPU.gdt_frames[0]), read
 * once, and its machine address: 0 for a null or LDT selector, one beyond the first page, no
 * GDT, a frame outside memory (those are Python's: descriptors._descriptor_address). */
static int guest_gdt_desc(struct aiovmm_kvm_ctx *c, uint64_t sel, uint64_t *ma_out, uint64_t *desc_out)
{
    const struct aiovmm_pv *pv = c->pv;
    uint64_t off = sel & ~7ULL;
    if ((sel & 4) || off == 0 || off + 8 > 4096 || !pv->gdt_frames_nr)
        return 0;
    uint64_t ma = (pv->gdt_frame0 << 12) + off;
    if (pv->gdt_frame0 >= (c->mem_size >> 12) || ma + 8 > c->mem_size)
        return 0;
    memcpy(desc_out, (const void *)(uintptr_t)(c->mem_base + ma), 8);
    *ma_out = ma;
    return 1;
}

/* The CS an iret frame names, as the IRETQ loads it (aiovmm/descriptors.py
 * iret_code_segment is the rule), for the cases done here: the selector (frame.cs | 3) if it
 * is FLAT_RING3_CS64, or names, in the guest's first GDT page (VCPU.gdt_frames), a present
 * 64-bit code segment (L set, D clear) of DPL 3 or conforming, as Linux's __USER_CS does;
 * else 0, Python's: a null or LDT selector, one beyond the first page, a fault, a
 * compatibility-mode segment, no GDT. Descriptor frames are typed (the guest cannot write
 * them but through Python's update_descriptor), read once; `*ma_out` is the guest
 * descriptor's machine address (0 for FLAT_RING3_CS64) and `*desc_out` the descriptor. */
static uint64_t iret_cs64(struct aiovmm_kvm_ctx *c, uint64_t cs, uint64_t *ma_out,
                          uint64_t *desc_out)
{
    uint64_t sel = (cs & 0xFFFF) | 3;
    *ma_out = 0;
    if (sel == USER_CS)
        return sel;
    uint64_t ma, desc;
    if (!guest_gdt_desc(c, sel, &ma, &desc))
        return 0;
    uint32_t hi = (uint32_t)(desc >> 32);
    if (!(hi & SEG_S) || !(hi & SEG_CODE) || !(hi & SEG_P))
        return 0;
    if (!(hi & SEG_CONFORMING) && (hi & SEG_DPL) != SEG_DPL)
        return 0;
    if (!(hi & SEG_L) || (hi & SEG_DB))
        return 0;
    *ma_out = ma;
    *desc_out = desc;
    return sel;
}

/* The kvm_segment a load of `sel` with the 8-byte descriptor `desc` leaves (aiovmm/
 * kvm_engine.py _seg_image, the same fields: base and limit as abi.segment_base_limit). */
static void seg_image(uint8_t img[24], uint16_t sel, uint64_t desc)
{
    uint32_t hi = (uint32_t)(desc >> 32);
    uint64_t base = ((desc >> 16) & 0xFFFFFF) | ((uint64_t)(hi >> 24) << 24);
    uint32_t limit = (uint32_t)(desc & 0xFFFF) | (hi & 0xF0000);
    if (hi & (1u << 23))
        limit = (limit << 12) | 0xFFF;
    memset(img, 0, 24);
    memcpy(img, &base, 8);
    memcpy(img + 8, &limit, 4);
    memcpy(img + 12, &sel, 2);
    img[14] = (hi >> 8) & 0xF;          /* type */
    img[15] = (hi >> 15) & 1;           /* present */
    img[16] = (hi >> 13) & 3;           /* dpl */
    img[17] = (hi >> 22) & 1;           /* db */
    img[18] = (hi >> 12) & 1;           /* s */
    img[19] = (hi >> 21) & 1;           /* l */
    img[20] = (hi >> 23) & 1;           /* g */
    img[21] = (hi >> 20) & 1;           /* avl */
}

#define SEG_WRITABLE (1u << 9)

/* The SS an iret frame names, as the IRETQ loads it after CS (aiovmm/descriptors.py
 * iret_stack_segment is the rule), for the case done here: (frame.ss | 3) naming, in the
 * guest's first GDT page, a present writable data segment of DPL 3, as Linux's __USER_DS
 * (0x2b) does; else 0, Python's: a null or LDT selector, one beyond the first page, one the
 * IRETQ refuses, no GDT. Read once; `*ma_out` and `*desc_out` as iret_cs64's. */
static uint64_t iret_ss(struct aiovmm_kvm_ctx *c, uint64_t ss, uint64_t *ma_out, uint64_t *desc_out)
{
    uint64_t sel = (ss & 0xFFFF) | 3, ma, desc;
    if (!guest_gdt_desc(c, sel, &ma, &desc))
        return 0;
    uint32_t hi = (uint32_t)(desc >> 32);
    if (!(hi & SEG_S) || (hi & SEG_CODE) || !(hi & SEG_WRITABLE) || (hi & SEG_DPL) != SEG_DPL
        || !(hi & SEG_P))
        return 0;
    *ma_out = ma;
    *desc_out = desc;
    return sel;
}

/* A segment load from the guest's GDT at `ma` (iret_cs64, iret_ss): its accessed bit set in
 * the descriptor as the CPU's load does (descriptors.set_accessed), and the image the
 * load leaves. */
static void load_guest_seg(struct aiovmm_kvm_ctx *c, uint8_t img[24], uint64_t sel, uint64_t ma,
                           uint64_t desc)
{
    desc |= (uint64_t)SEG_ACCESSED << 32;
    volatile uint8_t *hi_type = (volatile uint8_t *)(uintptr_t)(c->mem_base + ma + 5);
    if (!(*hi_type & 1))
        *hi_type |= 1;          /* the type's accessed bit: bit 40 of the descriptor */
    seg_image(img, (uint16_t)sel, desc);
}


/* HYPERVISOR_iret (aiovmm/traps.py do_iret, the same effect; Xen: xen/arch/x86/pv/iret.c):
 * the context (rax r11 rcx flags rip cs rflags rsp ss) on the guest stack at the SYSCALL,
 * copied once and used only from the copy (the guest, or a backend thread, may rewrite the
 * stack meanwhile). A return to user mode (CS with RPL 3) also toggles the mode, only when the
 * user root is registered and ready (root_ready) and the new RIP is canonical (Xen never
 * leaves through SYSRET to one). Python's: those that are not, a context that crosses a page
 * or cannot be read (Python then crashes the domain), a vcpu_info outside memory. Every check
 * is made before anything is written. */
static int fast_iret(struct aiovmm_kvm_ctx *c, uint64_t *r)
{
    struct aiovmm_pv *pv = c->pv;
    uint64_t rsp = r[KREG_RSP], ctx[9];
    if ((rsp & 0xFFF) > 4096 - sizeof ctx)
        return 0;
    uint64_t ma = guest_maddr(c, pv->kernel_root << 12, rsp, 0);
    if (ma == NO_MADDR)
        return 0;
    memcpy(ctx, (const void *)(uintptr_t)(c->mem_base + ma), sizeof ctx);
    uint64_t rax = ctx[0], r11 = ctx[1], rcx = ctx[2], flags = ctx[3], rip = ctx[4];
    uint64_t cs = ctx[5], rflags = ctx[6], ursp = ctx[7];
    int to_user = (cs & 3) == 3;
    /* Xen loads frame.cs | 3 with an IRETQ: only a 64-bit code segment it loads without a
     * fault is done here (iret_cs64); the rest may fault there or change mode: Python's
     * (traps.do_iret, descriptors.iret_code_segment decides). */
    /* Xen's SYSRET exit (VGCF_in_syscall and a canonical RIP) loads CS and SS from MSR_STAR
     * whatever the frame says: FLAT_RING3_CS64 unless the frame's CS is FLAT_RING3_CS32
     * (compatibility mode: Python's). */
    int sysret = (flags & VGCF_IN_SYSCALL) && canonical(rip);
    uint64_t desc_ma = 0, desc = 0;
    uint64_t sel = !sysret ? iret_cs64(c, cs, &desc_ma, &desc)
                   : ((cs & 0xFFFF) | 3) == FLAT_RING3_CS32 ? 0 : USER_CS;
    if (!sel)
        return 0;
    /* The same for SS (regs->ss = frame.ss | 3, checked by the IRETQ; SYSRET loads
     * FLAT_RING3_SS): FLAT_RING3_SS already loaded and the one to load, or Python's
     * (traps.do_iret). */
    uint16_t cur_ss;
    memcpy(&cur_ss, c->run + RUN_SREGS + SREG_SS * 24 + 12, 2);
    if (cur_ss != USER_SS)
        return 0;
    /* A frame SS other than FLAT_RING3_SS: one of the guest's own GDT (Linux returns to its
     * processes with __USER_DS), loaded here when iret_ss finds it usable. */
    uint64_t ss_ma = 0, ss_desc = 0, ss_sel = USER_SS;
    if (!sysret && ((ctx[8] & 0xFFFF) | 3) != USER_SS
        && !(ss_sel = iret_ss(c, ctx[8], &ss_ma, &ss_desc)))
        return 0;
    if (to_user && !(canonical(rip) && root_ready(pv->user_root, c->ready_uroot)))
        return 0;
    /* With VMASST architectural_iopl the iret sets the virtual IOPL (Xen's do_iret): a frame
     * that would change it is Python's. Without it the frame's IOPL is ignored. */
    if (((rflags & RF_IOPL) >> 12) != pv->iopl && architectural_iopl(pv))
        return 0;
    uint64_t info = pv->info_maddr;
    if (info + 2 > c->mem_size)
        return 0;
    if (to_user) {
        toggle_mode(c, 0);
        c->fast_user_irets++;
    }
    /* The iret loads a 64-bit code segment whatever CS the caller ran in (a kernel in
     * compatibility mode calls the hypercall page too), as traps.load_segments does for
     * Python's iret: FLAT_RING3_CS64's whole hidden part, or the hidden part the guest's
     * own descriptor gives (KVMEngine.load_segment), marked accessed in its GDT as the
     * CPU's load does (descriptors.set_accessed). CS is the first segment of kvm_sregs. */
    uint8_t img[24], *scs = c->run + RUN_SREGS;
    if (desc_ma) {
        load_guest_seg(c, img, sel, desc_ma, desc);
        memcpy(c->cpl3_cs, img, 24);
        c->cpl3_cs_set = 1;
    } else {
        memcpy(img, c->cs64, 24);
    }
    if (memcmp(scs, img, 24) != 0) {
        memcpy(scs, img, 24);
        mark_dirty(c->run, SYNC_SREGS);
    }
    if (ss_ma) {                /* after CS, as the IRETQ and traps._iret_segments */
        uint8_t *sss = c->run + RUN_SREGS + SREG_SS * 24;
        load_guest_seg(c, img, ss_sel, ss_ma, ss_desc);
        memcpy(c->cpl3_ss, img, 24);
        c->cpl3_ss_set = 1;
        if (memcmp(sss, img, 24) != 0) {
            memcpy(sss, img, 24);
            mark_dirty(c->run, SYNC_SREGS);
        }
    }
    r[KREG_RIP] = rip;
    r[KREG_RSP] = ursp;
    r[KREG_RFLAGS] = (rflags & ARCH_FLAGS & ~(RF_IOPL | RF_VM)) | RF_IF | 2;
    r[KREG_RAX] = rax;
    if (flags & VGCF_IN_SYSCALL) {      /* Xen's SYSRET exit: traps.do_iret says why */
        r[KREG_RCX] = rip;
        r[KREG_R11] = r[KREG_RFLAGS];
    } else {
        r[KREG_RCX] = rcx;
        r[KREG_R11] = r11;
    }
    ((volatile uint8_t *)(uintptr_t)(c->mem_base + info))[VCPU_INFO_MASK] = (rflags & RF_IF) ? 0 : 1;
    c->fast_calls[2]++;
    return 1;
}

/* A `syscall` from guest user mode, bounced to the guest kernel's syscall callback with its
 * stack switch and the toggle to kernel mode (aiovmm/traps.py user_syscall and bounce, the
 * same effect; Xen: x86_64/entry.S lstar_enter -> switch_to_kernel -> create_bounce_frame).
 * The exit's registers are the SYSCALL's (aiovmm_kvm_syscall_entry: RIP the return address,
 * RFLAGS the sanitized R11); the frame [rcx r11 rip cs rflags rsp ss] goes below the
 * registered kernel stack (16-byte aligned). Returns 1 if done, 0 for Python, with nothing
 * written, when: no callback is registered (Python raises #UD), the kernel root is not
 * ready, the frame would wrap below 0, lie in Xen's range or outside canonical space, cross a
 * page or not be writable through the kernel's tables (Python crashes the domain), the
 * vcpu_info lies outside memory, or an event would be deliverable after the bounce (Python
 * bounces and delivers it). The upcall mask and pending bytes are read once. */
static int fast_user_syscall(struct aiovmm_kvm_ctx *c, uint64_t *r)
{
    struct aiovmm_pv *pv = c->pv;
    uint64_t handler = pv->syscall_cb, cb_flags = pv->syscall_cb_flags;
    if (!handler || !root_ready(pv->kernel_root, c->ready_kroot))
        return 0;
    /* A virtual IOPL other than 0 belongs in the frame's RFLAGS with VMASST
     * architectural_iopl (traps.bounce): Python's. Without it the frame never carries it. */
    if (pv->iopl && architectural_iopl(pv))
        return 0;
    uint64_t s = pv->kernel_sp & ~0xFULL;
    if (s < BOUNCE_FRAME)
        return 0;
    uint64_t new_rsp = s - BOUNCE_FRAME;
    if ((new_rsp >= XEN_VIRT_START && new_rsp < XEN_VIRT_END + 64) || !canonical(new_rsp)
        || (new_rsp & 0xFFF) > 4096 - BOUNCE_FRAME)
        return 0;
    uint64_t ma = guest_maddr(c, pv->kernel_root << 12, new_rsp, 1);
    if (ma == NO_MADDR)
        return 0;
    uint64_t info = pv->info_maddr;
    if (info + 2 > c->mem_size)
        return 0;
    volatile uint8_t *vi = (volatile uint8_t *)(uintptr_t)(c->mem_base + info);
    uint8_t pending = vi[VCPU_INFO_PENDING], old_mask = vi[VCPU_INFO_MASK];
    int mask_events = (cb_flags & CALLBACKF_MASK_EVENTS) != 0;
    if (pending && !old_mask && !mask_events)
        return 0;
    uint64_t rip = r[KREG_RIP], rflags = r[KREG_RFLAGS], rsp = r[KREG_RSP];
    uint64_t frame[BOUNCE_FRAME / 8] = {
        rip, rflags, rip, USER_CS | ((uint64_t)old_mask << 32),
        (rflags & ~(RF_IF | RF_IOPL)) | (old_mask ? 0 : RF_IF), rsp, USER_SS,
    };
    memcpy((void *)(uintptr_t)(c->mem_base + ma), frame, sizeof frame);
    toggle_mode(c, 1);
    if (mask_events)
        vi[VCPU_INFO_MASK] = 1;
    r[KREG_RSP] = new_rsp;
    r[KREG_RIP] = handler;
    r[KREG_RFLAGS] = (rflags & ~(RF_TF | RF_NT | RF_RF | RF_VM | RF_AC | RF_DF)) | RF_IF;
    pv->last_frame_rsp = new_rsp;
    mark_dirty(c->run, SYNC_REGS);
    c->fast_bounces++;
    return 1;
}

/* VCPUOP_set_singleshot_timer / VCPUOP_stop_singleshot_timer on this vCPU itself (Linux
 * re-arms its tick with them), recorded for Python in pv->sshot_op (struct aiovmm_pv). Xen's
 * common_vcpu_op: only the calling vCPU's timer (-EINVAL for another's, -ENOENT for no such
 * vCPU: Python's), the 16-byte vcpu_set_singleshot_timer copied once (a pointer C cannot
 * read, or a struct across a page end: Python's, which answers -EFAULT or reads it), flags
 * ignored (Xen since 4.18 ignores VCPU_SSHOTTMR_future). Only a deadline in the future is
 * done here: one already passed, or >= 2^63 (Xen's s_time_t expiry is then negative), makes
 * Xen send the timer event before the hypercall returns (timers.py vcpuop_set_singleshot),
 * which is Python's, and so is one before the running slice's end (Python cuts the slice
 * at it). Returns 1 if done. */
static int fast_vcpu_op(struct aiovmm_kvm_ctx *c, uint64_t *r)
{
    struct aiovmm_pv *pv = c->pv;
    uint32_t cmd = (uint32_t)r[KREG_RDI], vcpuid = (uint32_t)r[KREG_RSI];
    if (vcpuid != pv->vcpu_id)
        return 0;
    if (cmd == VCPUOP_STOP_SINGLESHOT) {
        pv->sshot_op = SSHOT_STOP;
        return 1;
    }
    if (cmd != VCPUOP_SET_SINGLESHOT)
        return 0;
    uint64_t arg = r[KREG_RDX];
    if ((arg & 0xFFF) > 4096 - 16)
        return 0;
    uint64_t ma = guest_maddr(c, pv->kernel_root << 12, arg, 0);
    if (ma == NO_MADDR)
        return 0;
    uint64_t timeout;
    memcpy(&timeout, (const void *)(uintptr_t)(c->mem_base + ma), 8);   /* read once */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = ts.tv_sec * 1000000000LL + ts.tv_nsec - pv->clock_origin_ns;
    if (now < 0 || timeout >= (1ULL << 63) || timeout <= (uint64_t)now)
        return 0;
    /* A deadline the running slice would pass is Python's: it cuts the slice there, as
     * Xen's timer interrupt preempts the guest at it (aiovmm/timers.py run_due). */
    if (c->deadline_ns && c->deadline_ns > pv->clock_origin_ns
        && timeout < (uint64_t)(c->deadline_ns - pv->clock_origin_ns))
        return 0;           /* compared in system time: timeout + origin may pass INT64_MAX */
    pv->sshot_deadline = timeout;
    pv->sshot_op = SSHOT_SET;
    return 1;
}

/* A query whose answer depends on nothing the guest or the host can change, answered with
 * the value the Python handler gives (stored in pv by Python): *ret, and the index of its
 * fast_queries counter; -1 for anything else (Python's). Xen's do_xen_version(int cmd, ..)
 * and do_vcpu_op(int cmd, unsigned int vcpuid, ..) take 32-bit cmd and vcpuid.
 * - xen_version(XENVER_version): the version number, whatever the argument (Xen ignores it).
 * - vcpu_op(any cmd, vcpuid >= max_vcpus): Xen's do_vcpu_op looks the vCPU up before the
 *   command (domain_vcpu: NULL -> -ENOENT); no domain has that many vCPUs (Python refuses
 *   more at creation and restore). Linux asks VCPUOP_is_up of every possible CPU id at boot
 *   (~8,200 calls: xen_filter_cpu_maps up to NR_CPUS). Ids below max_vcpus are Python's. */
static int fast_query(struct aiovmm_kvm_ctx *c, const uint64_t *r, uint64_t *ret)
{
    const struct aiovmm_pv *pv = c->pv;
    uint64_t nr = r[KREG_RAX];
    if (nr == HC_XEN_VERSION && (uint32_t)r[KREG_RDI] == XENVER_VERSION && pv->xenver_version) {
        *ret = pv->xenver_version;
        return 0;
    }
    if (nr == HC_VCPU_OP && pv->no_vcpu && pv->max_vcpus
        && (uint32_t)r[KREG_RSI] >= pv->max_vcpus) {
        *ret = pv->no_vcpu;
        return 1;
    }
    return -1;
}

/* After a hypercall completed here, an event is deliverable: Xen's test_all_events bounces the
 * upcall to the guest's event callback (aiovmm/traps.py deliver_event -> bounce with
 * mask_events, the same effect: Xen's x86_64/entry.S process_pending_events). From kernel
 * mode the frame goes on the current stack with the CS it ran in, RPL cleared (0xe030
 * for the flat one); from user mode (an iret to user
 * just unmasked events) the vCPU toggles to kernel mode and the frame goes below the
 * registered kernel stack with the user CS (the selector it ran with; a CS other than the
 * flat one is replaced by the flat 64-bit one, as bounce's eng.write({"cs": USER_CS})). The
 * frame is [rcx r11 rip cs rflags rsp ss], 16-byte aligned below the stack. Returns 1 if done,
 * 0 for Python with nothing written, when: no event callback is registered, the kernel root
 * is not ready (from user mode), a virtual IOPL would go in the frame (VMASST
 * architectural_iopl), the stack lies in Xen's range (Python crashes the domain), the frame
 * would be non-canonical, cross a page or not be writable through the kernel's tables. The
 * caller found the event deliverable (event_deliverable: pending, not masked), so the frame
 * saves an unmasked state, as Python's does then. */
static int fast_upcall(struct aiovmm_kvm_ctx *c)
{
    struct aiovmm_pv *pv = c->pv;
    uint64_t *r = regs_of(c->run);
    uint64_t handler = pv->event_cb, info = pv->info_maddr;
    int was_kernel = pv->kernel_mode;
    if (!handler || info + 2 > c->mem_size)
        return 0;
    if (!was_kernel && !root_ready(pv->kernel_root, c->ready_kroot))
        return 0;
    if (pv->iopl && architectural_iopl(pv))
        return 0;
    volatile uint8_t *vi = (volatile uint8_t *)(uintptr_t)(c->mem_base + info);
    uint64_t rsp = r[KREG_RSP];
    uint64_t s = (was_kernel ? rsp : pv->kernel_sp) & ~0xFULL;
    if (s > XEN_VIRT_START && s < XEN_VIRT_END + 64)
        return 0;
    /* Below 56 the frame wraps as Python's does (Xen's 64-bit arithmetic): s 0 puts it in the
     * last 56 bytes of the address space, whole, as there; any other s < 56 crosses a page. */
    uint64_t new_rsp = s - BOUNCE_FRAME;
    if ((new_rsp & 0xFFF) > 4096 - BOUNCE_FRAME)
        return 0;
    uint64_t ma = guest_maddr(c, pv->kernel_root << 12, new_rsp, 1);   /* canonical too */
    if (ma == NO_MADDR)
        return 0;
    /* The CS and SS the vCPU ran in (traps.bounce: regs->cs, RPL cleared in kernel
     * context, and regs->ss); a CS other than the flat 64-bit one is replaced by it below,
     * as bounce does (create_bounce_frame: the handler runs with FLAT_KERNEL_CS, 64-bit
     * mode). An SS other than FLAT_KERNEL_SS (the guest's own, loaded by an iret) would be
     * Python's, which records it and loads the flat one; after a hypercall it never is
     * (the SYSCALL entry restores FLAT_KERNEL_SS, fast_iret takes only that one). */
    uint16_t sel, ss;
    memcpy(&sel, c->run + RUN_SREGS + 12, 2);
    memcpy(&ss, c->run + RUN_SREGS + SREG_SS * 24 + 12, 2);
    if (ss != USER_SS)
        return 0;
    uint64_t cs = was_kernel ? (uint64_t)(sel & ~3) : sel;
    uint64_t rip = r[KREG_RIP], rflags = r[KREG_RFLAGS];
    uint64_t frame[BOUNCE_FRAME / 8] = {
        r[KREG_RCX], r[KREG_R11], rip, cs,
        (rflags & ~(RF_IF | RF_IOPL)) | RF_IF, rsp, USER_SS,
    };
    memcpy((void *)(uintptr_t)(c->mem_base + ma), frame, sizeof frame);
    if (!was_kernel)
        toggle_mode(c, 1);
    if (sel != USER_CS) {
        memcpy(c->run + RUN_SREGS, c->cs64, 24);         /* the handler runs 64-bit */
        mark_dirty(c->run, SYNC_SREGS);
    }
    vi[VCPU_INFO_MASK] = 1;
    r[KREG_RSP] = new_rsp;
    r[KREG_RIP] = handler;
    r[KREG_RFLAGS] = (rflags & ~(RF_TF | RF_NT | RF_RF | RF_VM | RF_AC)) | RF_IF;
    pv->last_frame_rsp = new_rsp;
    mark_dirty(c->run, SYNC_REGS);           /* the sregs: toggle_mode marked them */
    c->fast_upcalls++;
    return 1;
}

/* A hypercall from guest kernel mode whose whole effect is this vCPU's state, completed
 * without Python (returns 1), or 0: Python handles it (aiovmm/hypercall.py dispatch). Only
 * the cases Xen always accepts are done here, each exactly as the Python handler does it
 * (aiovmm/traps.py do_stack_switch, do_set_segment_base, do_iret); every refusal, every
 * other `which` (SEGBASE_GS_USER_SEL reads the guest's GDT/LDT: descriptors.load_user_gs),
 * every iret fast_iret leaves goes to Python, so error codes and crashes come
 * from one place. The registers were copied by
 * KVM into kvm_run and are read once each. */
static int fast_hypercall(struct aiovmm_kvm_ctx *c, uint64_t *r)
{
    struct aiovmm_pv *pv = c->pv;
    uint64_t nr = r[KREG_RAX], a1 = r[KREG_RDI], a2 = r[KREG_RSI], ret = 0;
    int q = fast_query(c, r, &ret);
    if (q >= 0) {
        c->fast_queries[q]++;
    } else if (nr == HC_STACK_SWITCH) {
        /* fixup_guest_stack_selector: a 64-bit PV guest's stack selector has RPL 3. */
        pv->kernel_ss = a1 | 3;
        pv->kernel_sp = a2;
        c->fast_calls[0]++;
    } else if (nr == HC_SET_SEGMENT_BASE && (a1 == SEGBASE_FS || a1 == SEGBASE_GS_KERNEL)
               && canonical(a2)) {
        /* In kernel mode the live FS/GS base is the one set (kvm_sregs fs/gs .base); the
         * saved kernel GS base is taken from GS at the switch to user mode (vcpu.py). */
        memcpy(c->run + RUN_SREGS + (a1 == SEGBASE_FS ? 3 : 4) * 24, &a2, 8);
        mark_dirty(c->run, SYNC_SREGS);
        c->fast_calls[1]++;
    } else if (nr == HC_IRET) {
        if (!fast_iret(c, r))
            return 0;
        mark_dirty(c->run, SYNC_REGS);
        pv->hypercalls++;
        pv->fault_depth = 0;
        return 1;                  /* the registers are the context's, RAX included */
    } else if (nr == HC_VCPU_OP) {
        if (!fast_vcpu_op(c, r))
            return 0;
        c->fast_calls[3]++;
    } else {
        return 0;
    }
    r[KREG_RAX] = ret;
    mark_dirty(c->run, SYNC_REGS);
    pv->hypercalls++;
    pv->fault_depth = 0;
    return 1;
}

#define VEC_GP 13
#define ERR_FRAME 48                  /* bytes the CPU pushes with an error code */

/* #GP(0) at `cli` or `sti` in guest kernel mode (the vector stub's exit: aiovmm/kvm_engine.py
 * _from_vector, then traps.exception -> emulate.gp_fault): Xen's emulate_privileged_op makes
 * both no-ops when iopl_ok (the kernel counts as ring 1, ring 0 with VMASST
 * architectural_iopl; emulate.iopl_ok) and steps RIP past them. Linux (virtual IOPL 1) runs
 * ~5,200 of them per boot. Only the one-byte forms from 64-bit code (FLAT_RING3_CS64) at a
 * frame with error code 0 on the engine's stack are done here; a prefix, another opcode, a
 * byte C cannot read through the kernel's tables, user mode, a refused IOPL: Python's (which
 * decodes, emulates or bounces the #GP). Returns 1 if done. */
static int fast_cli_sti(struct aiovmm_kvm_ctx *c, uint64_t *r)
{
    struct aiovmm_pv *pv = c->pv;
    if (!pv->kernel_mode || (architectural_iopl(pv) ? 0 : 1) > pv->iopl)
        return 0;
    uint64_t sp = r[KREG_RSP];
    if (sp != c->r0_stack_va + 4096 - ERR_FRAME)
        return 0;
    uint64_t f[ERR_FRAME / 8];     /* err rip cs rflags rsp ss: the CPU's, not the guest's */
    memcpy(f, (const void *)(uintptr_t)(c->mem_base + c->r0_stack_maddr + 4096 - ERR_FRAME),
           sizeof f);
    /* CLI/STI fault with error code 0 and the 64-bit code segment: defensive checks. */
    if (f[0] != 0 || ((f[2] & 0xFFFF) | 3) != USER_CS)
        return 0;
    uint64_t ma = guest_maddr(c, pv->kernel_root << 12, f[1], 0);
    if (ma == NO_MADDR)
        return 0;
    uint8_t op = *(const volatile uint8_t *)(uintptr_t)(c->mem_base + ma);
    if (op != 0xFA && op != 0xFB)
        return 0;
    r[KREG_RIP] = f[1] + 1;
    r[KREG_RFLAGS] = f[3];
    r[KREG_RSP] = f[4];
    aiovmm_kvm_back_to_cpl3(c, 0);
    c->fast_cli_sti++;
    return 1;
}

/* After a hypercall: Xen's test_all_events. True if an event upcall is deliverable
 * (evtchn_upcall_pending && !evtchn_upcall_mask in this vCPU's vcpu_info: guest memory,
 * read as the Python path reads it). */
static int event_deliverable(struct aiovmm_kvm_ctx *c)
{
    uint64_t a = c->pv->info_maddr;
    if (a + 2 > c->mem_size)
        return 1;                  /* not ours to judge: Python decides */
    const volatile uint8_t *info = (const volatile uint8_t *)(uintptr_t)(c->mem_base + a);
    return info[VCPU_INFO_PENDING] && !info[VCPU_INFO_MASK];
}

/* A one-byte IN the engine has seen answered all ones by the shared port policy, at the same
 * RIP and port, with nothing but such INs and slice ends in between (so the policy's inputs,
 * which only the host changes at an exit, are the same; what may change at a slice's end is
 * checked by the engine then): answer it again without returning to Python.
 * Linux's quick_pit_calibrate reads port 0x42 100,000 times from two instructions. The
 * instruction is read again from memory each time (the guest may have rewritten it): only
 * `in $port,%al` (E4 port) or `in %dx,%al` (EC, KVM reports DX as the port) qualify, never
 * INS. Returns 1 if answered. */
static int fast_in(struct aiovmm_kvm_ctx *c, uint8_t *run, uint16_t port, uint64_t rip)
{
    for (uint32_t i = 0; i < c->fast_n; i++) {
        if (c->fast[i].rip != rip || c->fast[i].port != port)
            continue;
        const uint8_t *code = (const uint8_t *)(uintptr_t)(c->mem_base + c->fast[i].maddr);
        if (!(code[0] == 0xEC || (code[0] == 0xE4 && code[1] == port)))
            return 0;
        uint64_t off;
        memcpy(&off, run + 40, 8);                     /* io.data_offset */
        if (off < 48 || off >= c->run_size)
            return 0;
        run[off] = 0xFF;
        c->fast_hits++;
        return 1;
    }
    return 0;
}

/* The exit census (struct aiovmm_kvm_ctx census; aiovmm/kvm_engine.py Census decodes the
 * keys): one counter per exit, by what the exit was, counted before it is handled.
 *   CK_REASON + r   an exit other than KVM_EXIT_IO (r < 32)
 *   CK_KICK         KVM_RUN ended by the slice's timer (-EINTR)
 *   CK_HC + 64*nr + sub   a hypercall from guest kernel mode (the hypercall page or a
 *                   `syscall`), nr < 64; sub the command (RDI, 0..62; 63 above) for the
 *                   hypercalls whose first argument is one (CK_CMD_FIRST), else 0
 *   CK_USER + n     a guest user process's system call, n = RAX (511: 511 and above)
 *   CK_VEC + v      an exception or INT n through the IDT stubs (vector v)
 *   CK_PORT         any other port I/O exit (the guest's own)
 *   CK_SYSCALL32    a compat SYSCALL
 * and, besides the exit's own key, CK_VIA_PAGE for a hypercall made through the engine's
 * hypercall page (`out`) rather than with `syscall` (the census's one non-exit counter). */
/* xen_version, memory_op, console_io, grant_table_op, vcpu_op, set_segment_base,
 * fpu_taskswitch, sched_op, callback_op, event_channel_op, physdev_op, hvm_op, sysctl,
 * domctl, xsm_op, nmi_op, vm_assist, mmuext_op is by pointer (0). */
#define CK_CMD_FIRST ((1ULL << 17) | (1ULL << 12) | (1ULL << 18) | (1ULL << 20) | (1ULL << 24) \
                      | (1ULL << 25) | (1ULL << 5) | (1ULL << 29) | (1ULL << 30) | (1ULL << 32) \
                      | (1ULL << 33) | (1ULL << 34) | (1ULL << 35) | (1ULL << 36) | (1ULL << 27) \
                      | (1ULL << 28) | (1ULL << 21))

static void census_hc(uint64_t *census, const uint64_t *r)
{
    uint64_t nr = r[KREG_RAX], sub = 0;
    if (nr >= 64)
        nr = 63;
    else if (CK_CMD_FIRST >> nr & 1)
        sub = r[KREG_RDI] < 63 ? r[KREG_RDI] : 63;
    census[CK_HC + 64 * nr + sub]++;
}

static void census_note(struct aiovmm_kvm_ctx *c, int rc)
{
    uint64_t *census = c->census;
    uint8_t *run = c->run;
    if (rc < 0) {
        if (rc == -EINTR)
            census[CK_KICK]++;
        return;
    }
    uint32_t reason;
    memcpy(&reason, run + 8, 4);
    if (reason != 2) {
        census[CK_REASON + (reason < 32 ? reason : 31)]++;
        return;
    }
    uint16_t port;
    uint64_t rip;
    memcpy(&port, run + 34, 2);
    memcpy(&rip, run + 304 + 16 * 8, 8);
    const uint64_t *r = regs_of(run);
    if (rip >= c->stubs_lo && rip <= c->stubs_hi) {
        census[CK_VEC + (port & 0xFF)]++;
        return;
    }
    if (port == c->hcall_port && run[32] == 1) {
        census_hc(census, r);
        census[CK_VIA_PAGE]++;
        return;
    }
    if (port == c->syscall_port && run[32] == 1) {
        if (rip >= c->syscall_va && rip <= c->syscall_va + 2) {
            if (c->pv && c->pv->kernel_mode)
                census_hc(census, r);
            else
                census[CK_USER + (r[KREG_RAX] < 511 ? r[KREG_RAX] : 511)]++;
        } else {
            census[CK_SYSCALL32]++;
        }
        return;
    }
    census[CK_PORT]++;
}

/* One KVM_RUN, and the hot exits recognised here rather than in Python: returns 1 for an
 * `out %al` of one byte to the hypercall port from outside the vector stubs (a hypercall
 * through the engine's hypercall page, if the guest is in kernel mode: the caller checks),
 * 3 for the SYSCALL entry page's `out` (a guest `syscall`: Linux's hypercalls and its user
 * processes' system calls; RIP, RFLAGS, CS and SS already set back by aiovmm_kvm_syscall_entry)
 * that was not completed here (fast_hypercall, fast_user_syscall),
 * 4 when such a hypercall was completed here (fast_hypercall) and an event is now
 * deliverable (the caller runs the hypercall's tail: the upcall); a completed hypercall with
 * no deliverable event enters the guest again at once. 0 for any other exit (decoded in Python; an IN that fast_in()
 * answers is not returned: the guest is entered again at once), -EINTR when the slice's
 * deadline kicked, or -errno. The register file is kvm_run's sync-regs area (RIP at +304 + 16*8). */
/* Arm the slice's end `ns` from now (the grace after an exit handled past the deadline). */
static int arm_grace(struct aiovmm_kvm_ctx *c, int64_t ns)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t dl = now.tv_sec * 1000000000LL + now.tv_nsec + ns;
    if (aiovmm_kvm_slice_begin(c->run, c->timer, dl) < 0)
        return -1;
    c->deadline_ns = dl;
    return 0;
}

/* A grace whose end came before the guest ran an instruction (RIP unchanged: the host
 * preempted this thread between arming and entry, or the entry itself took longer) is armed
 * again, GRACE_RETRY_NS and then 4x longer each time, at most GRACE_RETRIES times: the
 * grace exists so the guest runs what the handler set up, and a loaded host must not take
 * it away (CI at load ~4 failed test_kvm's grace test once in ~2,700 tests). A guest
 * spinning at that very RIP costs at most ~2.1 ms more before the slice ends. */
#define GRACE_RETRY_NS 100000
#define GRACE_RETRIES 3

int aiovmm_kvm_run_ex(struct aiovmm_kvm_ctx *c)
{
    uint8_t *run = c->run;
    int64_t grace = c->grace_ns;
    int grace_tries = 0;
    uint64_t grace_rip = 0;
    if (grace) {
        /* The slice's deadline passed while the host handled an exit: the guest still gets
         * grace_ns from here, armed next to the ioctl so that a host preemption in between
         * is unlikely to use it up before the guest runs (aiovmm/kvm_engine.py _GRACE_NS). */
        c->grace_ns = 0;
        memcpy(&grace_rip, run + RUN_REGS + KREG_RIP * 8, 8);
        if (arm_grace(c, grace) < 0)
            return -EINTR;
    }
    for (;;) {
        if (c->deadline_ns) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec * 1000000000LL + now.tv_nsec >= c->deadline_ns)
                run[1] = 1;                            /* ends at once: -EINTR, as a kick */
        }
        c->exits++;
        if (ioctl(c->vcpu_fd, KVM_RUN_IOCTL, 0) < 0) {
            /* The answered INs stay: the engine checks them at the next slice's start. */
            int err = errno;
            if (c->census)
                census_note(c, -err);
            if (err == EINTR && grace && grace_tries < GRACE_RETRIES) {
                uint64_t rip;
                memcpy(&rip, run + RUN_REGS + KREG_RIP * 8, 8);
                if (rip == grace_rip) {
                    grace = grace_tries++ || grace > GRACE_RETRY_NS ? grace * 4 : GRACE_RETRY_NS;
                    if (arm_grace(c, grace) == 0)
                        continue;
                }
            }
            return -err;
        }
        grace = 0;                                     /* the guest ran to an exit */
        if (c->census)
            census_note(c, 0);
        uint32_t reason, count;
        uint16_t port;
        uint64_t rip;
        memcpy(&reason, run + 8, 4);
        if (reason != 2)                               /* KVM_EXIT_IO */
            return 0;
        memcpy(&port, run + 34, 2);
        memcpy(&count, run + 36, 4);
        memcpy(&rip, run + 304 + 16 * 8, 8);
        if (run[32] == 0 && run[33] == 1 && count == 1 && fast_in(c, run, port, rip))
            continue;                                  /* KVM completes it at the next entry */
        if (run[32] == 1 && run[33] == 1 && port == VEC_GP && count == 1
            && rip >= c->stubs_lo && rip <= c->stubs_hi && c->fast_hc && c->pv) {
            c->fast_n = 0;
            if (fast_cli_sti(c, regs_of(run)))
                continue;
            return 0;
        }
        if (run[32] == 1 && run[33] == 1 && port == c->hcall_port && count == 1
            && !(rip >= c->stubs_lo && rip <= c->stubs_hi)) {
            c->fast_n = 0;
            /* The engine's hypercall page (the stub's `ret`, or the iret stub's pushed
             * context, is the guest's to run next), where RIP is already past the `out`. */
            if (c->page_rip_after && c->fast_hc && c->pv && c->pv->kernel_mode
                && fast_hypercall(c, regs_of(run))) {
                c->fast_page++;
                if (event_deliverable(c) && !fast_upcall(c))
                    return 4;
                continue;
            }
            return 1;
        }
        if (run[32] == 1 && run[33] == 1 && port == c->syscall_port && count == 1
            && rip >= c->syscall_va && rip <= c->syscall_va + 2) {
            c->fast_n = 0;
            aiovmm_kvm_syscall_entry(c);
            if (c->fast_hc && c->pv && c->pv->kernel_mode && fast_hypercall(c, regs_of(run))) {
                if (event_deliverable(c) && !fast_upcall(c))
                    return 4;          /* completed: Python runs the hypercall's tail */
                continue;
            }
            /* A user process's system call: nothing deliverable after it (checked). */
            if (c->fast_hc && c->pv && !c->pv->kernel_mode && fast_user_syscall(c, regs_of(run)))
                continue;
            return 3;
        }
        return 0;
    }
}

/* KVM_RUN with immediate_exit set: completes a pending I/O instruction (KVM finishes it at
 * the start of the next KVM_RUN) without entering the guest. */
int aiovmm_kvm_complete(int vcpu_fd, uint8_t *run)
{
    uint8_t was = run[1];
    run[1] = 1;
    int r = ioctl(vcpu_fd, KVM_RUN_IOCTL, 0);
    int err = r < 0 ? errno : 0;
    if (!was)
        run[1] = 0;    /* a kick during the call is caught by the caller's deadline check */
    return err == EINTR ? 0 : -err;
}

/* The shadow guard's per-frame step (aiovmm/kvm_engine.py _ShadowGuard._diff_written, whose
 * _GuardArgs mirrors this struct), for a tracked page-table frame `mfn` the hypervisor wrote,
 * whose snapshot is page `slot` of the arena: every entry is read once from the frame,
 * compared with the snapshot and stored into it, so the snapshot is current after the call.
 * An entry that was present and changed in anything but A/D (removed, retargeted,
 * permissions changed), or whose index is in `cleared[0..ncleared)` (it lost A or D while
 * present: machine memory's write_pte reported it), is "lost": at level 1 it goes to
 * `out[512..)` (deferred: the old translation named a frame of the table's own domain) or
 * `out[0..)` (at once: a grant, Xen's page, ptwr's scratch); at higher levels always at once.
 * Lost entries are given as machine addresses. An entry at level > 1 that became present
 * or now names another frame (outside Xen's L4 slots l4_first..l4_last at level 4) adds its
 * frame to `out[1024..)`, a table to track: KVM walks it at the guest's next access either
 * way, and an untracked table's later changes would never be invalidated. Returns now | deferred << 10 | added << 20 (each at most 512). */
struct aiovmm_guard {
    uint64_t mem_base;             /* host address of machine address 0 */
    uint64_t arena;                /* host address of the snapshots (4 KiB each) */
    uint64_t owner;                /* host address of the owner array (uint16_t per frame) */
    uint64_t nr_frames;
    int32_t l4_first, l4_last;
    int32_t cleared[512];
    uint64_t out[1536];
};

static size_t guard_size(void) { return sizeof(struct aiovmm_guard); }

int aiovmm_kvm_guard_frame(struct aiovmm_guard *g, uint32_t mfn, uint32_t slot, int level,
                           int ncleared)
{
    const uint64_t *cur = (const uint64_t *)(uintptr_t)(g->mem_base + ((uint64_t)mfn << 12));
    uint64_t *snap = (uint64_t *)(uintptr_t)(g->arena + ((uint64_t)slot << 12));
    const uint16_t *owner = (const uint16_t *)(uintptr_t)g->owner;
    uint64_t base = (uint64_t)mfn << 12, *out = g->out;
    int now = 0, deferred = 0, added = 0;
    uint8_t lost[512];
    if (mfn >= g->nr_frames || ncleared < 0 || ncleared > 512)
        return -1;
    uint16_t own = owner[mfn];
    memset(lost, 0, sizeof lost);
    for (int k = 0; k < ncleared; k++)
        if (g->cleared[k] >= 0 && g->cleared[k] < 512)
            lost[g->cleared[k]] = 1;
    for (int i = 0; i < 512; i++) {
        uint64_t n = ((const volatile uint64_t *)cur)[i], o = snap[i];
        if (n == o && !lost[i])
            continue;
        snap[i] = n;
        if (lost[i] || ((o & PTE_PRESENT) && ((o ^ n) & ~AD_BITS))) {
            uint64_t a = base + 8 * (uint64_t)i, t = (o & PTE_FRAME) >> 12;
            if (level == 1 && t < g->nr_frames && owner[t] == own)
                out[512 + deferred++] = a;
            else
                out[now++] = a;
        }
        /* A table linked in: by an entry that became present, or one retargeted from
         * another table (mmu_update's present-to-present write; the old one is lost above). */
        if ((n & PTE_PRESENT) && (!(o & PTE_PRESENT) || ((o ^ n) & PTE_FRAME)) && level > 1
            && !(level == 4 && i >= g->l4_first && i <= g->l4_last))
            out[1024 + added++] = (n & PTE_FRAME) >> 12;
    }
    return now | deferred << 10 | added << 20;
}

/* A fresh VM (aiovmm/kvm_engine.py _VMPool): KVM_CREATE_VM, memory slot 0 = [0, size) at the
 * host address `addr`, KVM_CREATE_VCPU 0 (the costly step on kvm-pvm: ~5 ms under load),
 * KVM_SET_CPUID2 with `cpuid` (a struct kvm_cpuid2). Returns 0 with both fds stored, or
 * -errno (nothing left open). */
int aiovmm_kvm_make_vm(int kvm_fd, uint64_t size, uint64_t addr, const void *cpuid,
                       int *vm_fd_out, int *vcpu_fd_out)
{
    struct {
        uint32_t slot, flags;
        uint64_t gpa, size, addr;
    } region = {0, 0, 0, size, addr};
    int vm = ioctl(kvm_fd, KVM_CREATE_VM_IOCTL, 0);
    if (vm < 0)
        return -errno;
    int vcpu = -1, err;
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION_IOCTL, &region) < 0)
        goto fail;
    vcpu = ioctl(vm, KVM_CREATE_VCPU_IOCTL, 0);
    if (vcpu < 0)
        goto fail;
    if (ioctl(vcpu, KVM_SET_CPUID2_IOCTL, cpuid) < 0)
        goto fail;
    *vm_fd_out = vm;
    *vcpu_fd_out = vcpu;
    return 0;
fail:
    err = errno;
    if (vcpu >= 0)
        close(vcpu);
    close(vm);
    return -err;
}

/* The pool's worker: a plain pthread, so that making and destroying VMs never takes the GIL
 * (a Python worker thread did, and each of its GIL re-acquisitions could stall the event loop
 * for a scheduler latency on a loaded machine). It keeps `want` VMs ready and closes the
 * VMs engines retire (the last close runs KVM's VM teardown, milliseconds). */
#define POOL_MAX 8
#define RETIRED_MAX 64

struct aiovmm_kvm_pool {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    int kvm_fd, want, stop, nready, nretired;
    uint64_t size, addr;
    void *cpuid;
    int ready[POOL_MAX][2];
    int retired[RETIRED_MAX][2];
};

static void *pool_main(void *arg)
{
    struct aiovmm_kvm_pool *p = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);    /* signals are the loop thread's business */
    pthread_mutex_lock(&p->lock);
    for (;;) {
        if (p->nretired) {
            int fds[2] = {p->retired[p->nretired - 1][0], p->retired[p->nretired - 1][1]};
            p->nretired--;
            pthread_mutex_unlock(&p->lock);
            close(fds[0]);
            close(fds[1]);
            pthread_mutex_lock(&p->lock);
            continue;
        }
        if (p->stop)
            break;
        if (p->nready < p->want) {
            int vm, vcpu;
            pthread_mutex_unlock(&p->lock);
            int r = aiovmm_kvm_make_vm(p->kvm_fd, p->size, p->addr, p->cpuid, &vm, &vcpu);
            pthread_mutex_lock(&p->lock);
            if (r < 0) {
                p->want = 0;                /* the loop makes its own and sees the error */
                continue;
            }
            p->ready[p->nready][0] = vm;
            p->ready[p->nready][1] = vcpu;
            p->nready++;
            continue;
        }
        pthread_cond_wait(&p->wake, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Start a pool keeping `want` (<= POOL_MAX) VMs ready. `cpuid` is copied. NULL on failure. */
struct aiovmm_kvm_pool *aiovmm_kvm_pool_new(int kvm_fd, uint64_t size, uint64_t addr,
                                            const void *cpuid, size_t cpuid_len, int want)
{
    struct aiovmm_kvm_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->cpuid = malloc(cpuid_len);
    if (!p->cpuid) {
        free(p);
        return NULL;
    }
    memcpy(p->cpuid, cpuid, cpuid_len);
    p->kvm_fd = kvm_fd;
    p->size = size;
    p->addr = addr;
    p->want = want < POOL_MAX ? want : POOL_MAX;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    if (pthread_create(&p->thread, NULL, pool_main, p) != 0) {
        free(p->cpuid);
        free(p);
        return NULL;
    }
    return p;
}

/* A ready VM's fds, or -EAGAIN if none is ready (the caller makes one itself). The worker
 * is not woken here: a woken thread may preempt the caller on a loaded host (measured:
 * take() 4.4 ms median at load 11, 0.03 ms when nothing was woken), and the caller is in
 * the middle of creating a domain. It calls aiovmm_kvm_pool_refill() later. */
int aiovmm_kvm_pool_take(struct aiovmm_kvm_pool *p, int *vm_fd_out, int *vcpu_fd_out)
{
    int r = -EAGAIN;
    pthread_mutex_lock(&p->lock);
    if (p->nready) {
        p->nready--;
        *vm_fd_out = p->ready[p->nready][0];
        *vcpu_fd_out = p->ready[p->nready][1];
        r = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

/* Wake the worker to top the pool up. */
void aiovmm_kvm_pool_refill(struct aiovmm_kvm_pool *p)
{
    pthread_mutex_lock(&p->lock);
    pthread_cond_signal(&p->wake);
    pthread_mutex_unlock(&p->lock);
}

/* How many VMs are ready, and how many wait to be closed (tests wait for a settled pool). */
void aiovmm_kvm_pool_state(struct aiovmm_kvm_pool *p, int *ready, int *retired)
{
    pthread_mutex_lock(&p->lock);
    *ready = p->nready;
    *retired = p->nretired;
    pthread_mutex_unlock(&p->lock);
}

/* Hand a VM over to be closed by the worker (closed here if its queue is full). */
void aiovmm_kvm_pool_retire(struct aiovmm_kvm_pool *p, int vcpu_fd, int vm_fd)
{
    pthread_mutex_lock(&p->lock);
    if (p->nretired < RETIRED_MAX && !p->stop) {
        p->retired[p->nretired][0] = vcpu_fd;
        p->retired[p->nretired][1] = vm_fd;
        p->nretired++;
        pthread_cond_signal(&p->wake);
        pthread_mutex_unlock(&p->lock);
        return;
    }
    pthread_mutex_unlock(&p->lock);
    close(vcpu_fd);
    close(vm_fd);
}

/* Stop the worker (after it closed every retired VM), close the ready VMs, free the pool. */
void aiovmm_kvm_pool_free(struct aiovmm_kvm_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_signal(&p->wake);
    pthread_mutex_unlock(&p->lock);
    pthread_join(p->thread, NULL);
    for (int i = 0; i < p->nready; i++) {
        close(p->ready[i][1]);
        close(p->ready[i][0]);
    }
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->wake);
    free(p->cpuid);
    free(p);
}

/* The vCPU thread (AIOVMM_KVM_VCPU_THREAD=1, aiovmm/kvm_engine.py _VcpuThread): a plain
 * pthread per engine that makes every KVM_RUN of its vCPU, so that the event loop runs
 * backends meanwhile. It never takes the GIL and touches nothing but the run context, the
 * kvm_run page and guest memory (what aiovmm_kvm_run_ex touches on the loop thread today);
 * docs/design.md "vCPU slices on a vCPU thread" lists what that shares with the loop.
 * Every KVM_RUN of the vCPU runs here (KVM's KVM_RUN calls synchronize_rcu whenever the
 * calling thread changes), the slice timer signals this thread (it is created here), and
 * the kick handler's target, cur_immediate_exit, is this thread's kvm_run for its life.
 * One operation at a time: the loop posts it (thread_post) and either waits for it
 * (thread_call) or is told through `efd` (an eventfd the loop reads). */
#define VT_RUN_EX 1
#define VT_RUN 2
#define VT_COMPLETE 3
#define VT_STOP 4

struct aiovmm_kvm_thread {
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    pthread_t thread;
    struct aiovmm_kvm_ctx *ctx;
    int efd;
    int op;                 /* posted, not yet taken */
    int busy;               /* posted or running */
    int notify;             /* write efd when it ends */
    int rc;
    int ready;              /* 1 once started: timer made (timer_rc) */
    int timer_rc;
    timer_t timer;
    int64_t spin_ns;        /* after an operation, poll this long for the next one before
                               sleeping (aiovmm_kvm_thread_spin; 0: sleep at once) */
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *vthread_main(void *arg)
{
    struct aiovmm_kvm_thread *t = arg;
    sigset_t set;
    sigfillset(&set);
    sigdelset(&set, AIOVMM_KICK_SIGNAL);
    pthread_sigmask(SIG_SETMASK, &set, NULL);  /* the process's signals are the loop's */
    cur_immediate_exit = t->ctx->run + 1;
    int trc = aiovmm_kvm_timer_create(&t->timer);
    pthread_mutex_lock(&t->lock);
    t->timer_rc = trc;
    t->ready = 1;
    pthread_cond_broadcast(&t->done);
    for (;;) {
        int64_t spin = __atomic_load_n(&t->spin_ns, __ATOMIC_RELAXED);
        if (!t->op && spin > 0) {
            /* The loop usually posts the next run tens of microseconds after an exit it
             * handles: polling spares the thread's wake-up (a futex wake and a scheduler
             * latency) at the price of a busy core meanwhile. */
            pthread_mutex_unlock(&t->lock);
            int64_t end = mono_ns() + spin;
            while (!__atomic_load_n(&t->op, __ATOMIC_ACQUIRE) && mono_ns() < end)
                __builtin_ia32_pause();
            pthread_mutex_lock(&t->lock);
        }
        while (!t->op)
            pthread_cond_wait(&t->wake, &t->lock);
        int op = t->op, rc = 0;
        t->op = 0;
        if (op == VT_STOP)
            break;
        pthread_mutex_unlock(&t->lock);
        if (op == VT_RUN_EX)
            rc = aiovmm_kvm_run_ex(t->ctx);
        else if (op == VT_RUN)
            rc = aiovmm_kvm_run(t->ctx->vcpu_fd);
        else if (op == VT_COMPLETE)
            rc = aiovmm_kvm_complete(t->ctx->vcpu_fd, t->ctx->run);
        pthread_mutex_lock(&t->lock);
        t->rc = rc;
        t->busy = 0;
        int notify = t->notify;
        t->notify = 0;
        pthread_cond_broadcast(&t->done);
        if (notify) {
            uint64_t one = 1;
            ssize_t w = write(t->efd, &one, 8);
            (void)w;
        }
    }
    t->busy = 0;
    pthread_mutex_unlock(&t->lock);
    if (!trc)
        timer_delete(t->timer);
    return NULL;
}

/* Start the thread for `ctx`, telling ends through eventfd `efd`; its slice timer (which
 * signals it) is stored in ctx->timer. NULL on failure. */
struct aiovmm_kvm_thread *aiovmm_kvm_thread_new(struct aiovmm_kvm_ctx *ctx, int efd)
{
    struct aiovmm_kvm_thread *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->ctx = ctx;
    t->efd = efd;
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->wake, NULL);
    pthread_cond_init(&t->done, NULL);
    if (pthread_create(&t->thread, NULL, vthread_main, t) != 0) {
        free(t);
        return NULL;
    }
    pthread_mutex_lock(&t->lock);
    while (!t->ready)
        pthread_cond_wait(&t->done, &t->lock);
    int trc = t->timer_rc;
    pthread_mutex_unlock(&t->lock);
    if (trc) {
        pthread_mutex_lock(&t->lock);
        t->op = VT_STOP;
        pthread_cond_signal(&t->wake);
        pthread_mutex_unlock(&t->lock);
        pthread_join(t->thread, NULL);
        free(t);
        return NULL;
    }
    ctx->timer = t->timer;
    return t;
}

/* Kick the vCPU (the slice timer's kick, sooner): immediate_exit set, so that the next
 * KVM_RUN returns -EINTR at its entry (also when the run just ended and its exit is still on
 * its way to the loop: else an event raised meanwhile waited for the slice's end), and the
 * thread signalled if a run is in progress, which makes KVM_RUN return -EINTR now. */
void aiovmm_kvm_thread_kick(struct aiovmm_kvm_thread *t)
{
    pthread_mutex_lock(&t->lock);
    __atomic_store_n(t->ctx->run + 1, 1, __ATOMIC_SEQ_CST);
    if (t->busy)
        pthread_kill(t->thread, AIOVMM_KICK_SIGNAL);
    pthread_mutex_unlock(&t->lock);
}

static void vthread_wait_idle(struct aiovmm_kvm_thread *t)
{
    while (t->busy)
        pthread_cond_wait(&t->done, &t->lock);
}

/* Post `op`; its end is told through efd. -EBUSY if one is in flight. */
int aiovmm_kvm_thread_post(struct aiovmm_kvm_thread *t, int op)
{
    pthread_mutex_lock(&t->lock);
    if (t->busy) {
        pthread_mutex_unlock(&t->lock);
        return -EBUSY;
    }
    t->op = op;
    t->busy = 1;
    t->notify = 1;
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    return 0;
}

/* The result of the last operation (after its efd notice, or thread_call). */
int aiovmm_kvm_thread_result(struct aiovmm_kvm_thread *t)
{
    pthread_mutex_lock(&t->lock);
    int rc = t->rc;
    pthread_mutex_unlock(&t->lock);
    return rc;
}

/* Run `op` there and wait for it (an operation in flight is kicked and waited for first;
 * its result is then lost, and its efd notice stays to be read). */
int aiovmm_kvm_thread_call(struct aiovmm_kvm_thread *t, int op)
{
    pthread_mutex_lock(&t->lock);
    if (t->busy) {
        __atomic_store_n(t->ctx->run + 1, 1, __ATOMIC_SEQ_CST);
        pthread_kill(t->thread, AIOVMM_KICK_SIGNAL);
        vthread_wait_idle(t);
    }
    t->op = op;
    t->busy = 1;
    t->notify = 0;
    pthread_cond_signal(&t->wake);
    vthread_wait_idle(t);
    int rc = t->rc;
    pthread_mutex_unlock(&t->lock);
    return rc;
}

/* Kick the operation in flight and wait until it ended (1 if there was one). Its efd
 * notice and result stay for the loop. */
int aiovmm_kvm_thread_quiesce(struct aiovmm_kvm_thread *t)
{
    pthread_mutex_lock(&t->lock);
    int was = t->busy;
    if (was) {
        __atomic_store_n(t->ctx->run + 1, 1, __ATOMIC_SEQ_CST);
        pthread_kill(t->thread, AIOVMM_KICK_SIGNAL);
        vthread_wait_idle(t);
    }
    pthread_mutex_unlock(&t->lock);
    return was;
}

/* A full memory barrier (mfence): the xen_mb() of io/ring.h's event-index checks and of
 * evtchn_set_pending, needed by the loop's side only while guest code runs concurrently
 * on a vCPU thread (aiovmm/memory.py mb). */
void aiovmm_kvm_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void aiovmm_kvm_thread_spin(struct aiovmm_kvm_thread *t, int64_t ns)
{
    __atomic_store_n(&t->spin_ns, ns, __ATOMIC_RELAXED);
}

/* Stop the thread (after kicking what runs there), delete its timer, free it. */
void aiovmm_kvm_thread_free(struct aiovmm_kvm_thread *t)
{
    aiovmm_kvm_thread_quiesce(t);
    pthread_mutex_lock(&t->lock);
    t->op = VT_STOP;
    t->busy = 1;
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->wake);
    pthread_cond_destroy(&t->done);
    free(t);
}
