/* Bytes the hypervisor writes into a page of code the guest has run must run
 * next time (Xen runs the bytes in memory; an emulated vCPU keeps translations
 * of the old ones unless the hypervisor drops them).
 * The guest puts `mov eax, 1; ret` in a page and calls it, then:
 *  how=copy: GNTTABOP_copy by frame number (DOMID_SELF) puts `mov eax, 2; ret`
 *            from a data page over it; calls it again: result copy_status 0,
 *            result after_copy 2.
 *  how=host: grants the page (and a flag page) to domid 0, prints
 *            "code_write: ref code=<r> flag=<f>" and spins until the host has
 *            written the flag (it writes new code first, grants.host_copy_to);
 *            calls it again: result after_host <the imm32 the host wrote>.
 * A control call after the guest's own store of `mov eax, 4; ret`: result
 * after_store 4. */
#include "hostile.h"
#include "gnttab.h"
#include "time.h"

typedef long (*fn_t)(void);

static void put_code(volatile u8 *p, u32 imm)
{
    p[0] = 0xB8;                      /* mov eax, imm32 (zero-extends into rax) */
    p[1] = (u8)imm; p[2] = (u8)(imm >> 8); p[3] = (u8)(imm >> 16); p[4] = (u8)(imm >> 24);
    p[5] = 0xC3;                      /* ret */
}

void app_main(void)
{
    hostile_traps_init();
    long rc = gnttab_init();
    if (rc) panic("gnttab_init: %ld", rc);
    u8 *code = alloc_page();
    u8 *data = alloc_page();
    volatile u64 *flag = alloc_page();
    fn_t fn = (fn_t)(void *)code;
    put_code(code, 1);
    long first = 0;
    for (int i = 0; i < 3; i++)       /* run (and translate) it */
        first = fn();
    result("first", first);
    char how[8] = "copy";
    cmdline_str(cmdline(), "how", how, sizeof(how));
    if (strcmp(how, "host")) {
        put_code(data, 2);
        struct gnttab_copy op;
        memset(&op, 0, sizeof(op));
        op.source.u.gmfn = virt_to_mfn(data);
        op.source.domid = DOMID_SELF;
        op.dest.u.gmfn = virt_to_mfn(code);
        op.dest.domid = DOMID_SELF;
        op.len = 6;
        rc = HYPERVISOR_grant_table_op(GNTTABOP_copy, &op, 1);
        if (rc) panic("GNTTABOP_copy returned %ld", rc);
        result("copy_status", op.status);
        result("after_copy", fn());
    } else {
        long rcode = gnttab_grant_access(0, virt_to_mfn(code), 0);
        long rflag = gnttab_grant_access(0, virt_to_mfn((void *)flag), 0);
        if (rcode < 0 || rflag < 0) panic("grant table full");
        *flag = 0;
        printk("code_write: ref code=%ld flag=%ld\n", rcode, rflag);
        u64 until = monotonic_ns() + 20000000000UL;
        while (!*flag && monotonic_ns() < until)
            ;
        result("host_flag", (long)*flag);
        result("after_host", fn());
    }
    put_code(code, 4);
    result("after_store", fn());
    poweroff();
}
