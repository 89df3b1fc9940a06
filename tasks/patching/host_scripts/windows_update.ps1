# Assesses (and with -Operation Install, installs) Windows updates through the Windows Update
# Agent API, printing one JSON document: the WuReport model in tasks/patching/windows_update.py.
# Assess changes nothing on the host.
#
# The agent refuses installer calls (and, on newer builds, searcher calls) from a network logon
# such as WinRM or SSH, so the work runs as SYSTEM in a temporary scheduled task that writes its
# JSON to a private temp file; this script waits for it, prints it and always removes the task.
# One script for both operations: they share the task runner and every reader below.
param(
    [ValidateSet('Assess', 'Install')]
    [string]$Operation = 'Assess',
    # Comma-separated KB numbers (KB5034441) or update GUIDs to install.
    [string]$UpdateIds = '',
    [string]$Criteria = "IsInstalled=0 and IsHidden=0 and Type='Software'",
    [int]$TimeoutSeconds = 7200
)
$ErrorActionPreference = 'Stop'

$worker = {
    param([string]$OutFile, [string]$Operation, [string]$UpdateIds, [string]$Criteria)
    $ErrorActionPreference = 'Stop'
    $resultNames = @('NotStarted', 'InProgress', 'Succeeded', 'SucceededWithErrors', 'Failed', 'Aborted')

    function Get-RebootPending {
        $cbs = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\RebootPending'
        $wu = 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\WindowsUpdate\Auto Update\RebootRequired'
        $manager = Get-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Control\Session Manager' -ErrorAction SilentlyContinue
        [ordered]@{
            component_based_servicing = [bool](Test-Path -Path $cbs)
            windows_update            = [bool](Test-Path -Path $wu)
            pending_file_rename       = [bool]($manager -and $manager.PendingFileRenameOperations)
        }
    }

    function Get-OsInfo {
        $os = Get-CimInstance -ClassName Win32_OperatingSystem
        $current = Get-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion'
        [ordered]@{
            caption           = [string]$os.Caption
            version           = [string]$os.Version
            build             = '{0}.{1}' -f $current.CurrentBuild, $current.UBR
            azure_edition     = [bool]($os.Caption -match 'Azure Edition')
            last_boot_up_time = $os.LastBootUpTime.ToUniversalTime().ToString('o')
        }
    }

    function ConvertTo-UpdateRecord($Update) {
        $classification = 'Other'
        foreach ($category in $Update.Categories) {
            if ($category.Type -eq 'UpdateClassification') { $classification = [string]$category.Name }
        }
        # InstallationBehavior.RebootBehavior: 0 never reboots, 1 always requires, 2 can request.
        $reboot = @('never', 'always', 'may')[[int]$Update.InstallationBehavior.RebootBehavior]
        $kbs = @($Update.KBArticleIDs | ForEach-Object { [string]$_ })
        $id = if ($kbs.Count -gt 0) { 'KB' + $kbs[0] } else { [string]$Update.Identity.UpdateID }
        $released = $null
        if ($Update.LastDeploymentChangeTime) { $released = $Update.LastDeploymentChangeTime.ToString('yyyy-MM-dd') }
        [ordered]@{
            id               = $id
            update_id        = [string]$Update.Identity.UpdateID
            revision         = [int]$Update.Identity.RevisionNumber
            title            = [string]$Update.Title
            classification   = $classification
            severity         = [string]$Update.MsrcSeverity
            kb_article_ids   = $kbs
            size_bytes       = [int64]$Update.MaxDownloadSize
            release_date     = $released
            reboot_behaviour = $reboot
            hotpatch         = [bool]($Update.Title -match 'Hotpatch')
            downloaded       = [bool]$Update.IsDownloaded
        }
    }

    function Install-Selected($Session, $Found, [string[]]$Wanted) {
        $collection = New-Object -ComObject 'Microsoft.Update.UpdateColl'
        $offered = @()
        foreach ($update in $Found.Updates) {
            $record = ConvertTo-UpdateRecord $update
            if ($Wanted -contains $record.id.ToUpperInvariant() -or $Wanted -contains $record.update_id.ToUpperInvariant()) {
                if (-not $update.EulaAccepted) { $update.AcceptEula() }
                [void]$collection.Add($update)
                $offered += $record.id.ToUpperInvariant()
                $offered += $record.update_id.ToUpperInvariant()
            }
        }
        $summary = [ordered]@{
            result_code     = 0
            result          = 'NotStarted'
            reboot_required = $false
            updates         = @()
            not_offered     = @($Wanted | Where-Object { $offered -notcontains $_ })
        }
        if ($collection.Count -eq 0) { return $summary }
        $downloader = $Session.CreateUpdateDownloader()
        $downloader.Updates = $collection
        [void]$downloader.Download()
        $installer = $Session.CreateUpdateInstaller()
        $installer.Updates = $collection
        $outcome = $installer.Install()
        $summary.result_code = [int]$outcome.ResultCode
        $summary.result = $resultNames[[int]$outcome.ResultCode]
        $summary.reboot_required = [bool]$outcome.RebootRequired
        for ($i = 0; $i -lt $collection.Count; $i++) {
            $one = $outcome.GetUpdateResult($i)
            $summary.updates += [ordered]@{
                id          = (ConvertTo-UpdateRecord $collection.Item($i)).id
                result_code = [int]$one.ResultCode
                result      = $resultNames[[int]$one.ResultCode]
                hresult     = [int]$one.HResult
            }
        }
        return $summary
    }

    $report = [ordered]@{
        schema_version = 1
        operation      = $Operation.ToLowerInvariant()
        computer       = $env:COMPUTERNAME
        os             = Get-OsInfo
        reboot_pending = $null
        updates        = @()
        install        = $null
        errors         = @()
    }
    try {
        $session = New-Object -ComObject 'Microsoft.Update.Session'
        $session.ClientApplicationID = 'patchdrill'
        $searcher = $session.CreateUpdateSearcher()
        $found = $searcher.Search($Criteria)
        if ($Operation -eq 'Install') {
            $wanted = @($UpdateIds -split ',' | Where-Object { $_.Trim() } | ForEach-Object { $_.Trim().ToUpperInvariant() })
            $report.install = Install-Selected $session $found $wanted
            # What is still missing afterwards is the judge of what really installed.
            $found = $searcher.Search($Criteria)
        }
        foreach ($update in $found.Updates) { $report.updates += ConvertTo-UpdateRecord $update }
    } catch {
        $report.errors += ('{0}: {1}' -f $_.Exception.GetType().Name, $_.Exception.Message)
    }
    $report.reboot_pending = Get-RebootPending
    $partial = "$OutFile.partial"
    $report | ConvertTo-Json -Depth 6 | Set-Content -Path $partial -Encoding UTF8
    Move-Item -Path $partial -Destination $OutFile -Force
}

$work = Join-Path -Path $env:ProgramData -ChildPath ('patchdrill\wu-' + [guid]::NewGuid().ToString('N'))
$taskName = 'patchdrill-' + (Split-Path -Path $work -Leaf)
New-Item -ItemType Directory -Path $work -Force | Out-Null
try {
    # Only SYSTEM and Administrators may read the worker and its report.
    icacls.exe $work /inheritance:r /grant:r 'SYSTEM:(OI)(CI)F' 'Administrators:(OI)(CI)F' | Out-Null
    $script = Join-Path -Path $work -ChildPath 'worker.ps1'
    $outFile = Join-Path -Path $work -ChildPath 'report.json'
    $argsFile = Join-Path -Path $work -ChildPath 'arguments.json'
    Set-Content -Path $script -Value $worker.ToString() -Encoding UTF8
    # Arguments travel in a file: a task's command line would need quoting of the criteria.
    [ordered]@{ Operation = $Operation; UpdateIds = $UpdateIds; Criteria = $Criteria } |
        ConvertTo-Json | Set-Content -Path $argsFile -Encoding UTF8
    $command = '$a = Get-Content -Raw -Path ''{0}'' | ConvertFrom-Json; & ''{1}'' -OutFile ''{2}'' -Operation $a.Operation -UpdateIds $a.UpdateIds -Criteria $a.Criteria' -f $argsFile, $script, $outFile
    $encoded = [Convert]::ToBase64String([Text.Encoding]::Unicode.GetBytes($command))
    $action = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand $encoded"
    $principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
    Register-ScheduledTask -TaskName $taskName -Action $action -Principal $principal -Force | Out-Null
    $started = (Get-Date).AddSeconds(-1)
    Start-ScheduledTask -TaskName $taskName
    $deadline = (Get-Date).AddSeconds($TimeoutSeconds)
    while (-not (Test-Path -Path $outFile)) {
        if ((Get-Date) -gt $deadline) {
            Stop-ScheduledTask -TaskName $taskName -ErrorAction SilentlyContinue
            throw "Windows Update $Operation did not finish within $TimeoutSeconds seconds"
        }
        $info = Get-ScheduledTaskInfo -TaskName $taskName
        $state = (Get-ScheduledTask -TaskName $taskName).State
        if ($info.LastRunTime -ge $started -and $state -eq 'Ready' -and -not (Test-Path -Path $outFile)) {
            throw "the Windows Update task ended (result $($info.LastTaskResult)) without writing its report"
        }
        Start-Sleep -Seconds 2
    }
    Get-Content -Path $outFile -Raw -Encoding UTF8
} finally {
    Unregister-ScheduledTask -TaskName $taskName -Confirm:$false -ErrorAction SilentlyContinue
    Remove-Item -Path $work -Recurse -Force -ErrorAction SilentlyContinue
}
